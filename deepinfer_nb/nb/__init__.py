"""The notebook layer: magics, widgets, rich reprs and inline chat. Talks to `cluster.py` only."""
