"""The in-kernel runtime: ONE background thread with its own asyncio loop.

Everything asynchronous a notebook kernel hosts lives on this loop: the store client, the
controller, the optional in-kernel worker, the gateway's uvicorn server, watches and metric polls.
ipykernel's own loop is never used (no nest_asyncio). Cells submit coroutines with
`Runtime.run(coro, timeout=...)`, which waits on a `concurrent.futures.Future`; a KeyboardInterrupt
(kernel interrupt) during that wait cancels the coroutine on the loop, waits briefly for the
cancellation to finish, and re-raises, so the engine request or start-up step is really aborted.

`HostedServices` composes what a kernel hosts with `services.ServiceSet` (the same composition root,
store options and stop order as the CLI); an `atexit` hook stops them at interpreter exit so
engines this kernel launched do not outlive it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .. import procenv
from ..errors import DeepInferError, RuntimeTimeoutError, StoreError
from ..services import ServiceSet

log = logging.getLogger(__name__)
T = TypeVar("T")

CANCEL_GRACE_S = 5.0
"""How long an interrupted wait lets the cancelled coroutine clean up (abort RPCs, streams)."""


class Runtime:
    """A daemon thread running an asyncio loop, plus thread-safe ways to use it."""

    def __init__(self, *, name: str = "deepinfer-runtime") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise DeepInferError("the runtime is not started")
        return self._loop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the loop thread (idempotent); returns once the loop runs."""
        with self._lock:
            if self.running:
                return
            ready = threading.Event()
            loop = procenv.new_event_loop()

            def main() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                try:
                    loop.run_forever()
                finally:
                    _cancel_all(loop)
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    loop.close()

            self._loop = loop
            self._thread = threading.Thread(target=main, name=self._name, daemon=True)
            self._thread.start()
            if not ready.wait(10):
                raise DeepInferError("the runtime loop did not start within 10 s")

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop the loop (cancelling what still runs on it) and join the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            if thread.is_alive():
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)
            self._loop = None
            self._thread = None

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the loop; the caller owns the returned future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result.

        On timeout the coroutine is cancelled and `RuntimeTimeoutError` raised; on
        KeyboardInterrupt it is cancelled and the interrupt re-raised.
        """
        if self.in_loop_thread():
            coro.close()
            raise DeepInferError("Runtime.run() called from the runtime thread (would deadlock)")
        finished = threading.Event()
        started = threading.Event()

        async def tracked() -> T:
            started.set()
            try:
                return await coro
            finally:
                finished.set()

        future = self.submit(tracked())
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # short slices: a pending KeyboardInterrupt is delivered between them at the latest
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise concurrent.futures.TimeoutError
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    return future.result(0.1 if left is None else min(0.1, left))
        except concurrent.futures.TimeoutError:
            _cancel_and_wait(future, started, finished)
            raise RuntimeTimeoutError(f"timed out after {timeout:g} s (cancelled)") from None
        except KeyboardInterrupt:
            _cancel_and_wait(future, started, finished)
            raise

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call a plain function on the loop thread (for widget callbacks from the kernel)."""
        self.loop.call_soon_threadsafe(fn, *args)


def _cancel_and_wait(
    future: concurrent.futures.Future[Any], started: threading.Event, finished: threading.Event
) -> None:
    # Cancelling the concurrent future cancels the loop-side task; the task then needs a moment
    # to run its `finally` blocks (abort the engine request). A second interrupt here must not
    # leave the cancellation half done, so it is swallowed.
    future.cancel()
    deadline = time.monotonic() + CANCEL_GRACE_S
    while not finished.is_set() and time.monotonic() < deadline:
        if not started.is_set() and time.monotonic() > deadline - CANCEL_GRACE_S + 0.5:
            return  # cancelled before it ever ran: nothing to clean up
        with contextlib.suppress(KeyboardInterrupt):
            finished.wait(0.05)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


# ---- the process-wide runtime

_RUNTIME: Runtime | None = None
_EXIT_HOOKS: list[Callable[[], None]] = []
_ATEXIT_REGISTERED = False


def get_runtime() -> Runtime:
    """The kernel's one runtime, started on first use."""
    global _RUNTIME, _ATEXIT_REGISTERED
    if _RUNTIME is None:
        _RUNTIME = Runtime()
    _RUNTIME.start()
    if not _ATEXIT_REGISTERED:
        atexit.register(_at_exit)
        _ATEXIT_REGISTERED = True
    return _RUNTIME


def on_exit(hook: Callable[[], None]) -> None:
    """Run `hook` (from the main thread, before the loop stops) at interpreter exit."""
    _EXIT_HOOKS.append(hook)


def remove_exit_hook(hook: Callable[[], None]) -> None:
    with contextlib.suppress(ValueError):
        _EXIT_HOOKS.remove(hook)


def _at_exit() -> None:
    while _EXIT_HOOKS:
        hook = _EXIT_HOOKS.pop()
        try:
            hook()
        except BaseException as exc:
            log.warning("deepinfer exit hook failed: %s", exc)
    if _RUNTIME is not None:
        _RUNTIME.stop()


# ---- what a kernel hosts


def default_node_id() -> str:
    """This host's node id for the in-kernel worker: the hostname, cleaned to a record name.
    Stable across kernel restarts, so a new kernel's worker finds the old one's state file."""
    import re

    name = re.sub(r"[^a-z0-9._-]+", "-", socket.gethostname().lower()).strip("-._")[:63]
    return name.strip("-._") or "local"


class HostedServices:
    """The store client, cluster view, controller, worker and gateway one kernel runs.

    All methods except `current()`/`exit_hook()` are coroutines for the runtime loop.
    """

    _current: HostedServices | None = None

    def __init__(
        self,
        *,
        store_url: str,
        settings: Any = None,
        node_id: str | None = None,
        with_worker: bool = True,
        gateway_port: int | None = None,
        gateway_host: str = "127.0.0.1",
    ) -> None:
        from ..config import Settings

        self.requested_store = store_url
        self.store_url = store_url
        self.settings = settings or Settings.load()
        self.node_id = node_id or default_node_id()
        self._want_worker = with_worker
        self._want_gateway = gateway_port
        self.gateway_host = gateway_host
        self.created: set[str] = set()
        self.services = ServiceSet(self.settings)
        self.view: Any = None
        self._clients: dict[str, Any] = {}
        self.last_ttft: dict[str, float] = {}
        """Engine id -> time to first token of this kernel's last chat with it."""
        self.started = False

    @classmethod
    def current(cls) -> HostedServices | None:
        return cls._current

    @property
    def store(self) -> Any:
        return self.services.store

    @property
    def worker(self) -> Any:
        return self.services.worker

    @property
    def controller(self) -> Any:
        return self.services.controller

    @property
    def gateway_port(self) -> int | None:
        gateway = self.services.gateway
        return None if gateway is None else gateway.port

    @property
    def gateway_url(self) -> str | None:
        if self.gateway_port is None:
            return None
        host = "127.0.0.1" if self.gateway_host in ("0.0.0.0", "::", "") else self.gateway_host
        return f"http://{host}:{self.gateway_port}"

    @property
    def api_keys(self) -> list[Any]:
        """The gateway's configured keys (`config.ApiKey`), read from the settings' sources."""
        from ..config import read_keys

        return read_keys(self.settings.server)

    @property
    def api_key(self) -> str:
        """The key this kernel's own calls to the gateway use: an admin key (the notebook may
        manage deployments), "" when the gateway runs without keys."""
        from ..config import admin_secret

        return admin_secret(self.api_keys)

    # ---- start ----

    async def start(self) -> None:
        try:
            await self._start_store()
            await self._start_controller()
            if self._want_worker:
                await self.start_worker()
            if self._want_gateway is not None:
                await self.start_gateway(self._want_gateway)
        except BaseException:
            await self.services.aclose()
            raise
        self.started = True
        HostedServices._current = self
        on_exit(self.exit_hook)

    async def ensure(self, *, with_worker: bool, gateway_port: int | None) -> None:
        """`up` again: start what was asked for and is not running yet; reuse the rest."""
        if with_worker and self.worker is None:
            await self.start_worker()
        if gateway_port is not None and self.services.gateway is None:
            await self.start_gateway(gateway_port)

    async def _start_store(self) -> None:
        from .view import ClusterView

        url = self.requested_store
        if url in ("etcd", "etcd://", "etcd://local"):
            from ..config import home_dir

            etcd = await self.services.start_local_etcd(
                home_dir() / "etcd" / "data", log_path=home_dir() / "etcd" / "etcd.log"
            )
            url = etcd.url
        store = await self.services.open_store(url)
        self.store_url = store.url
        self.view = ClusterView(store)
        await self.view.start()
        self.services.callback("view", self.view.stop)

    async def _start_controller(self) -> None:
        await self.services.start_controller()

    async def start_worker(self) -> None:
        await self.services.start_worker(node=self.node_id, advertise_host="127.0.0.1")

    async def start_gateway(self, port: int, *, timeout: float = 30.0) -> None:
        await self.services.start_gateway(host=self.gateway_host, port=port, timeout=timeout)

    async def stop_gateway(self) -> None:
        await self.services.stop_gateway()

    # ---- engines ----

    def client(self, engine: Any) -> Any:
        from ..engine.client import EngineClient

        key = f"{engine.endpoint}|{engine.auth_token}"
        if key not in self._clients:
            self._clients[key] = EngineClient(engine.endpoint, token=engine.auth_token)
        return self._clients[key]

    async def stream_chat(self, engine: Any, request: Any) -> Any:
        """Async generator of `ChatDelta`s from one engine; closing it early cancels the request
        on the engine (the gRPC call is cancelled and an explicit Cancel is sent)."""
        import uuid

        from .chat import delta_from_event

        client = self.client(engine)
        if not request.request_id:
            request.request_id = "nb-" + uuid.uuid4().hex[:16]
        t0 = time.monotonic()
        ttft = 0.0
        finished = False
        try:
            async for event in client.chat_stream(request):
                if not ttft and any(c.text for c in event.deltas):
                    ttft = time.monotonic() - t0
                    self.last_ttft[engine.id] = ttft
                finished = finished or event.finished
                yield delta_from_event(event, engine=engine.id, ttft_s=ttft)
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    await asyncio.shield(client.cancel(request.request_id))

    async def metrics(self, engine: Any) -> Any:
        return await self.client(engine).metrics()

    async def logs(self, engine_id: str, lines: int) -> str:
        if self.worker is None:
            return "(this kernel runs no worker: read the logs on the engine's node)"
        result = self.worker.logs(engine_id, lines)
        if asyncio.iscoroutine(result):
            result = await result
        if isinstance(result, list):
            result = "\n".join(result)
        return str(result or "(no log output yet)")

    # ---- stop ----

    async def shutdown(self, *, grace_s: float = 60.0) -> None:
        """Delete the deployments this kernel created, wait for their engines, stop everything.

        With the store unreachable nothing can be deleted, nor seen to stop: the deployments
        are left for the user to delete once it is back (the log says which), and the rest of
        the stop gives up on the store quickly. This kernel's own engines are stopped anyway,
        by its worker's drain."""
        from ..store import keys

        names: set[str] = set()
        for name in sorted(self.created):
            try:
                await self.store.delete(keys.deployment(name))
                names.add(name)
            except StoreError as exc:
                self.store.fail_fast()  # down now: each further call gives up in seconds
                log.warning(
                    "could not delete deployment %s (%s); delete it once the store is back",
                    name,
                    exc,
                )
        if names and self.view is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self.view.wait_for(
                        lambda s: (
                            not any(
                                e.deployment in names and e.state.value != "Stopped"
                                for e in s.engines.values()
                            )
                        )
                    ),
                    grace_s,
                )
        self.created.clear()
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        self._clients.clear()
        await self.services.aclose()
        self.services = ServiceSet(self.settings)  # a later start begins afresh
        self.started = False
        if HostedServices._current is self:
            HostedServices._current = None
        remove_exit_hook(self.exit_hook)

    def exit_hook(self) -> None:
        """At interpreter exit: stop this kernel's engines and services (bounded wait)."""
        runtime = _RUNTIME
        if runtime is None or not runtime.running or not self.started:
            return
        grace = float(self.settings.agent.stop_grace_s) + 10.0
        with contextlib.suppress(Exception):
            runtime.run(self.shutdown(grace_s=grace), timeout=grace + 20.0)
