"""Small network helpers any layer may use (this module imports nothing of the package): the one
place that picks a free TCP port for a server a moment before it binds it."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now on `host` ("" and "localhost" mean 127.0.0.1). Whoever
    binds it moments later may lose a race to another process: callers treat that as a start
    failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("localhost", "") else "127.0.0.1", 0))
        return int(s.getsockname()[1])
