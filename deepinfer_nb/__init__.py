"""deepinfer-nb: deploy and use LLMs from a Jupyter notebook.

`%load_ext deepinfer_nb` loads the magics; the Python API is the same surface without them:
`deepinfer_nb.connect()` returns a `Cluster`. Importing the package stays light: the API, IPython
and the runtime are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

__all__ = ["__version__", "connect", "load_ipython_extension", "unload_ipython_extension"]

if TYPE_CHECKING:
    from .client.cluster import Cluster


def connect(store: str = "memory://", **kwargs: Any) -> Cluster:
    """Connect to a cluster (see `deepinfer_nb.client.cluster.connect`)."""
    from .client.cluster import connect as _connect

    return _connect(store, **kwargs)


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext deepinfer_nb`: register the `%deepinfer` magics."""
    from .nb.magics import DeepInferMagics

    ipython.register_magics(DeepInferMagics(shell=ipython, parent=ipython))


def unload_ipython_extension(ipython: Any) -> None:
    """`%unload_ext deepinfer_nb`: stop what this kernel started, then drop the magics."""
    from .nb.magics import DeepInferMagics

    magics = ipython.magics_manager.registry.get("DeepInferMagics")
    if isinstance(magics, DeepInferMagics) and magics.cluster is not None:
        magics.cluster.shutdown()
        magics.cluster = None
    ipython.magics_manager.magics["line"].pop("deepinfer", None)
    ipython.magics_manager.magics["cell"].pop("deepinfer", None)
