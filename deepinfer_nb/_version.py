"""`__version__`, read once from the installed distribution's metadata (pyproject.toml is the
one place the version is written)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deepinfer-nb")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
