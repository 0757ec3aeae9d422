"""Small network helpers any layer may use: the one place that picks a free TCP port for a server
a moment before it binds it, and the one socket binder for the servers we host (the gateway)."""

from __future__ import annotations

import socket

from .errors import ConfigError

__all__ = ["bind_socket", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now on `host` ("" and "localhost" mean 127.0.0.1). Whoever
    binds it moments later may lose a race to another process: callers treat that as a start
    failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("localhost", "") else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def bind_socket(host: str, port: int, *, what: str = "the gateway") -> socket.socket:
    """A listening, non-blocking TCP socket on `host`:`port` (0: a free port), bound here so that
    a taken port fails at once with an error that says what to do. Made with proto IPPROTO_TCP:
    asyncio sets TCP_NODELAY on accepted connections only then (else a response written as
    headers then body waits about 40 ms for the client's delayed ACK)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot bind {what} to {host}:{port}: {exc.strerror}; "
            "pick another port (0 picks a free one)"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
