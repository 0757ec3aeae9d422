"""Peak memory of a notebook run, as a Binder-sized container would feel it.

Runs each notebook with nbclient in a fresh kernel (and a fresh DEEPINFER_HOME sharing the built
models) and samples, every `--interval` seconds, the PSS of the kernel and every process under it
(engine shims, vLLM's EngineCore, ...) from /proc/PID/smaps_rollup. PSS splits shared pages among
the processes that map them, so the sum over the tree is the tree's real share of memory. Reports
the peak total, what each role held at that moment, and the peak while each cell ran.

    python benchmarks/notebook_memory.py notebooks/quickstart.ipynb notebooks/binder.ipynb \
        --json .artifacts/notebook_memory.json

The Jupyter server is not in the tree (Binder runs one too: JupyterLab with jupyter-server-proxy
measured 79 MiB PSS idle). Results: README "Run on Binder".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nbformat
import psutil
from nbclient import NotebookClient

MIB = 1024 * 1024


def pss_bytes(pid: int) -> int:
    """The process's proportional set size (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def role(proc: psutil.Process, kernel_pid: int) -> str:
    """ "kernel", "engine BACKEND NAME" for an engine shim and everything under it (vLLM's
    EngineCore), or "other" (any other child of the kernel)."""
    if proc.pid == kernel_pid:
        return "kernel"
    with contextlib.suppress(psutil.Error):
        for p in (proc, *proc.parents()):
            if p.pid == kernel_pid:
                break
            cmd = p.cmdline()
            if "deepinfer_nb.engine" in cmd:
                return f"engine {_flag(cmd, '--backend')} {_flag(cmd, '--served-model-name')}"
    return "other"


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1] if name in cmd[:-1] else "?"


class Sampler(threading.Thread):
    """Samples the kernel's process tree until stopped; keeps the peak and per-cell peaks."""

    def __init__(self, client: NotebookClient, interval: float) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.interval = interval
        self.cell = -1
        self.peak = 0
        self.peak_roles: dict[str, int] = {}
        self.cell_peaks: dict[int, int] = {}
        self.samples = 0
        self._stop_event = threading.Event()

    def _kernel_pid(self) -> int | None:
        km = getattr(self.client, "km", None)
        proc = getattr(getattr(km, "provisioner", None), "process", None)
        return getattr(proc, "pid", None)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            pid = self._kernel_pid()
            if pid is None:
                continue
            try:
                procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except psutil.Error:
                continue
            roles: dict[str, int] = {}
            for proc in procs:
                name = role(proc, pid)
                roles[name] = roles.get(name, 0) + pss_bytes(proc.pid)
            total = sum(roles.values())
            self.samples += 1
            if total > self.peak:
                self.peak, self.peak_roles = total, roles
            self.cell_peaks[self.cell] = max(self.cell_peaks.get(self.cell, 0), total)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def measure(path: Path, *, interval: float, timeout: float) -> dict[str, Any]:
    nb = nbformat.read(path, as_version=4)
    models = Path(os.environ.get("DEEPINFER_HOME", "~/.cache/deepinfer-nb")).expanduser() / "models"
    with tempfile.TemporaryDirectory(prefix="nbmem-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "models").symlink_to(models)
        saved = os.environ.get("DEEPINFER_HOME")
        os.environ["DEEPINFER_HOME"] = str(home)  # the kernel inherits it
        client = NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": tmp}}
        )
        sampler = Sampler(client, interval)

        def on_cell(cell: Any, cell_index: int, **_: Any) -> None:
            sampler.cell = cell_index

        client.on_cell_execute = on_cell
        sampler.start()
        started = time.monotonic()
        try:
            client.execute()
        finally:
            sampler.stop()
            if saved is None:
                os.environ.pop("DEEPINFER_HOME", None)
            else:
                os.environ["DEEPINFER_HOME"] = saved
    code = {i: c.source.splitlines()[0] for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    return {
        "notebook": str(path),
        "seconds": round(time.monotonic() - started, 1),
        "samples": sampler.samples,
        "interval_s": interval,
        "peak_pss_mib": round(sampler.peak / MIB),
        "at_peak_mib": {k: round(v / MIB) for k, v in sorted(sampler.peak_roles.items())},
        "cell_peaks_mib": {
            code[i]: round(v / MIB) for i, v in sorted(sampler.cell_peaks.items()) if i in code
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for path in args.notebooks:
        result = measure(path, interval=args.interval, timeout=args.timeout)
        results.append(result)
        print(json.dumps(result, indent=2), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(f"{r['notebook']}: peak {r['peak_pss_mib']} MiB PSS {r['at_peak_mib']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
