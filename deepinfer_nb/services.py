"""The one composition root: which services a process hosts, how they are started, the one stop
order, and how a command waits for SIGTERM/SIGINT.

`ServiceSet` is used by the kernel runtime (`client/runtime.py`) and by every long-running
`deepinfer-nb` command (etcd, up, serve, worker, controller, gateway). Each `start_*`/`open_store`
call enters one service into an `AsyncExitStack`, so the stop order is the reverse of the start
order, whoever composes them:

    local etcd  <  store client  <  controller  <  worker  <  gateway
    (stops last)                                              (stops first)

The gateway stops first (no new requests), then the worker drains its engines, then the controller
resigns, then the store closes, then a local etcd server stops. Stopping puts the store in
fail-fast mode first: etcd may be what went away, and a stop must take seconds, not minutes.
One service failing to stop is logged and does not keep the others running.

The store always gets the settings' store options (etcd TLS files, user, password), so a notebook
and the CLI open the same store the same way. `serve_until_signalled` is how a command runs: its
services until SIGTERM or SIGINT (the same clean stop for both), or until one of them ends.
`run_until_signalled` runs such a command's coroutine: a SIGTERM that comes while it is still
starting (an etcd server can answer its health check before the command has printed a line) stops
what was started and exits 0, as a later one does, instead of killing the process half-started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import procenv
from .config import ApiKey, Settings
from .models import ProcessMetrics, StoreMetrics
from .store import MetaStore, open_store

if TYPE_CHECKING:
    from .control.controller import Controller
    from .control.metrics import MetricsPublisher
    from .control.worker import Worker
    from .gateway.server import GatewayServer
    from .store.certs import CertFiles
    from .store.local_etcd import LocalEtcd

__all__ = ["ServiceSet", "run_until_signalled", "serve_until_signalled"]

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 120.0
"""The most one service may take to stop (a worker's drain waits for its engines' grace)."""


class ServiceSet:
    """The services one process hosts, over one `Settings`; `async with` or `aclose()` stops them.

    Services are imported on first start, so a process pays only for what it runs (a standalone
    worker never imports FastAPI)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.load()
        self.local_etcd: LocalEtcd | None = None
        self.store: MetaStore | None = None
        self.controller: Controller | None = None
        self.worker: Worker | None = None
        self.gateway: GatewayServer | None = None
        self.publisher: MetricsPublisher | None = None
        self._process_name = ""
        self.tasks: list[asyncio.Task[Any]] = []
        """Services that run as a task (the controller): if one ends, the process should stop."""
        self._stack = contextlib.AsyncExitStack()

    # ---- starting ----------------------------------------------------------------------------

    async def start_local_etcd(
        self,
        data_dir: str | Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        peer_port: int = 0,
        log_path: str | Path | None = None,
        tls: CertFiles | None = None,
    ) -> LocalEtcd:
        """A local etcd server (dies with this process); the store then defaults to it (with
        `tls`: TLS and client-certificate auth; the store then presents the server's own
        certificate, which doubles as this machine's client certificate)."""
        from .store.local_etcd import LocalEtcd

        etcd = LocalEtcd(
            data_dir, port=port, host=host, peer_port=peer_port, log_path=log_path, tls=tls
        )
        # started from this (long-lived) thread: the parent-death signal follows the thread
        etcd.start()
        self.local_etcd = etcd
        self._push("local etcd", lambda: asyncio.to_thread(etcd.stop))
        self.settings.storage.use_url(etcd.url)
        if tls is not None:
            storage = self.settings.storage
            storage.etcd_ca_cert, storage.etcd_cert, storage.etcd_key = (
                str(tls.ca),
                str(tls.cert),
                str(tls.key),
            )
        return etcd

    async def open_store(self, url: str | None = None) -> MetaStore:
        """The store client for `url` (default: the settings'), with the settings' store options."""
        if url is not None:
            self.settings.storage.use_url(url)
        storage = self.settings.storage
        store = open_store(storage.url, **storage.store_options())
        self.store = store
        self._push("store", store.close)
        return store

    async def start_controller(self, *, identity: str = "") -> Controller:
        from .control.controller import Controller

        self._start_publisher()
        controller = Controller(
            self._need_store(), settings=self.settings.scheduler, identity=identity
        )
        task = asyncio.create_task(controller.run(), name="deepinfer-controller")
        self.controller = controller
        self.tasks.append(task)

        async def stop() -> None:
            await controller.stop()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
            self.controller = None

        self._push("controller", stop)
        return controller

    async def start_worker(
        self, *, node: str, advertise_host: str = "127.0.0.1", engine_python: str | None = None
    ) -> Worker:
        from .control.worker import Worker

        self._start_publisher()
        worker = Worker(
            self._need_store(),
            node_id=node,
            settings=self.settings,
            advertise_host=advertise_host,
            engine_python=engine_python or self.settings.agent.engine_python or sys.executable,
        )
        await worker.start()
        self.worker = worker
        if self.gateway is not None:  # GET /v1/engines/{id}/logs reads this worker's files
            self.gateway.app.state.log_source = worker

        async def stop() -> None:
            log.info("draining", extra={"node": node})
            if self.gateway is not None:
                self.gateway.app.state.log_source = None
            await worker.stop()
            self.worker = None

        self._push("worker", stop)
        return worker

    async def start_gateway(
        self,
        *,
        host: str | None = None,
        port: int | None = None,
        api_keys: Sequence[str | ApiKey] | None = None,
        timeout: float = 30.0,
        log_level: str = "warning",
    ) -> GatewayServer:
        """The gateway on `host`:`port` (default: [server]); 0 picks a free port. `api_keys`
        default to the keys [server] configures (`config.read_keys`)."""
        from .gateway.server import GatewayServer
        from .netutil import bind_socket

        self._start_publisher()
        host = self.settings.server.host if host is None else host
        port = self.settings.server.port if port is None else port
        sock = bind_socket(host, port)
        server = GatewayServer(
            self._need_store(),
            settings=self.settings,
            api_keys=api_keys,
            sock=sock,
            log_level=log_level,
        )
        server.app.state.log_source = self.worker  # engine logs, when a worker runs here
        await server.start(timeout=timeout)
        self.gateway = server
        self._push("gateway", self.stop_gateway)
        return server

    async def stop_gateway(self) -> None:
        """Stop the gateway now (idempotent; the rest keeps running)."""
        server, self.gateway = self.gateway, None
        if server is not None:
            await server.stop()

    def _start_publisher(self) -> None:
        """This process's metrics snapshot in the store (control/metrics.py), once it hosts a
        service: the gateway's /metrics shows its controller, worker and store errors."""
        if self.publisher is not None:
            return
        from .control.metrics import MetricsPublisher, process_name

        self._process_name = process_name()
        self.publisher = MetricsPublisher(
            self._need_store(),
            collect=self._process_metrics,
            interval_s=self.settings.server.metrics_interval_s,
        )
        self.publisher.start()
        publisher = self.publisher

        async def stop() -> None:
            await publisher.stop()
            self.publisher = None

        self._push("metrics publisher", stop)

    def _process_metrics(self) -> ProcessMetrics:
        store = self._need_store()
        return ProcessMetrics(
            process=self._process_name,
            host=socket.gethostname(),
            pid=os.getpid(),
            controller=self.controller.metrics() if self.controller else None,
            worker=self.worker.metrics() if self.worker else None,
            store=StoreMetrics(
                url=store.url, retries=store.counters.retries, failures=store.counters.failures
            ),
        )

    def callback(self, name: str, stop: Callable[[], Awaitable[Any]]) -> None:
        """Stop something else of the caller's in this set's order (before what is running now)."""
        self._push(name, stop)

    # ---- stopping ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop everything, in reverse start order (idempotent)."""
        if self.store is not None:
            self.store.fail_fast()
        await self._stack.aclose()
        self.tasks.clear()
        self.store = None

    async def __aenter__(self) -> ServiceSet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _push(self, name: str, stop: Callable[[], Awaitable[Any]]) -> None:
        async def stop_quietly() -> None:
            try:
                await asyncio.wait_for(stop(), STOP_TIMEOUT_S)
            except Exception as exc:  # one failing to stop must not keep the rest running
                log.warning("stopping the %s failed: %s", name, exc)

        self._stack.push_async_callback(stop_quietly)

    def _need_store(self) -> MetaStore:
        if self.store is None:
            raise RuntimeError("open_store() first: every service needs the store")
        return self.store


async def serve_until_signalled(services: ServiceSet, *, ready: str = "") -> int:
    """Run `services` (already started) until SIGTERM or SIGINT, or until a service task ends;
    then stop them all. `ready` is logged once everything runs. The exit code: 0, or 1 when a
    service failed."""
    code = 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if ready:
            log.info("%s", ready)
        procenv.freeze_heap()
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([stopping, *services.tasks], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        ended = [t for t in services.tasks if t.done()]
        for task in ended:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s failed: %s", task.get_name(), task.exception())
                code = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        tasks = list(services.tasks)
        await services.aclose()
        for task in tasks:  # what did not end with its service (e.g. a watch on a process)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return code


def run_until_signalled(main: Coroutine[Any, Any, int]) -> int:
    """`procenv.run(main)` for a command whose `main` ends in `serve_until_signalled`: until that
    takes over, SIGTERM cancels `main` (its `ServiceSet` stops what it started) and the exit code
    is 0. SIGINT keeps asyncio's own handling (KeyboardInterrupt, exit 130)."""
    return procenv.run(_stop_on_sigterm(main))


async def _stop_on_sigterm(main: Coroutine[Any, Any, int]) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    asked = False

    def stop() -> None:
        nonlocal asked
        asked = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        return await main
    except asyncio.CancelledError:
        if not asked:
            raise
        print("stopped while starting (SIGTERM)", file=sys.stderr, flush=True)
        return 0
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
