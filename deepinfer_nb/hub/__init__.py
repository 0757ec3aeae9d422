"""Hub models before an engine starts, shared by the control plane and every entry point:
`fit` (will it fit: memory from config.json), `preflight` (the checks before a deployment is
written) and `failures` (which faults are permanent). Below `control` and `gateway`, above
`engine` (local model aliases) in DESIGN.md's layers; the worker's downloads live in
`control/downloads.py`."""
