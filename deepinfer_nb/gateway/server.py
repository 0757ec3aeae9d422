"""Hosting the gateway: uvicorn on the caller's event loop, on a socket bound here.

`GatewayServer` runs `uvicorn.Server` as a task of the *current* loop (the notebook runtime's
background thread, or the CLI's `asyncio.run`), never a loop of its own, and binds the listening
socket itself so port 0 works and the real port is known before the first request. It refuses a
non-loopback address unless the app requires an API key. It never touches process signals: in a
kernel SIGINT belongs to the kernel (uvicorn's own capture would swallow a notebook interrupt and
re-raise it later, anywhere); the CLI's signals are `services.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator, Sequence
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from ..config import ApiKey, Settings, read_keys
from ..errors import ConfigError
from ..netutil import bind_socket
from ..store import MetaStore
from .app import build_app
from .security import check_bind

log = logging.getLogger(__name__)


def _tcp_nodelay_capable(sock: socket.socket) -> socket.socket:
    """The same listening socket, marked as TCP so asyncio sets TCP_NODELAY on every accepted
    connection. asyncio only does so when `sock.proto == IPPROTO_TCP`; a socket made with proto
    0 (the default) leaves Nagle on, and a response written as headers then body then waits for
    the client's delayed ACK: about 40 ms added to every request."""
    if sock.proto == socket.IPPROTO_TCP or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return sock
    return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal capture: whoever embeds the gateway owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class GatewayServer:
    """One running gateway. `await start()`, then `url`; `await stop()` to end it.

    `target` is an app from `build_app`, or a store to build one over (then API keys come from
    `api_keys`, else from the variables and keys file `settings.server` names). `sock` is a
    listening socket bound by the caller; without it one is bound on `host`:`port`.
    """

    def __init__(
        self,
        target: FastAPI | MetaStore,
        *,
        settings: Settings | None = None,
        api_keys: Sequence[str | ApiKey] | None = None,
        host: str | None = None,
        port: int | None = None,
        sock: socket.socket | None = None,
        log_level: str = "warning",
    ) -> None:
        settings = settings or Settings()
        if isinstance(target, MetaStore):
            if api_keys is None:
                api_keys = read_keys(settings.server)
            target = build_app(target, settings=settings, api_keys=api_keys)
        self.app = target
        if sock is not None:
            host, port = sock.getsockname()[:2]
        self.host = host or settings.server.host
        self.port = settings.server.port if port is None else port
        check_bind(self.host, ["set"] if self.app.state.auth_enabled else [])
        self._log_level = log_level
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock = sock

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, *, timeout: float = 30.0) -> None:
        if self._sock is None:
            self._sock = bind_socket(self.host, self.port)
        self._sock = _tcp_nodelay_capable(self._sock)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level=self._log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=30,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._server.started:
            if self._task.done():
                self._close_socket()
                # uvicorn exits (without raising) when the lifespan start-up fails
                exc = self._task.exception()
                raise ConfigError(f"the gateway failed to start: {exc or 'see the log'}")
            if loop.time() > deadline:
                await self.stop()
                raise ConfigError(f"the gateway did not start within {timeout:.0f} s")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
