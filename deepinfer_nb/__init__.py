"""deepinfer-nb: deploy and use LLMs from a Jupyter notebook.

`%load_ext deepinfer_nb` loads the magics; the Python API is the same surface without them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
