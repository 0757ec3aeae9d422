"""`deepinfer-nb up`: a whole single-machine cluster in one process.

    deepinfer-nb up [--store memory://|etcd://HOST:PORT] [--node NAME] [-c config.toml]
                    [--gateway-port 8082] [--gateway-host 127.0.0.1] [--api-key-env VAR]

Runs the store client (the embedded memory:// store by default), the controller, one worker and
the OpenAI gateway on one asyncio loop until SIGTERM or Ctrl-C, then stops them in reverse order:
the gateway first, then the worker drains its engines, then the controller resigns, then the
store closes. Services are started in `_services()`, the one place to add more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from .. import aio, logs
from ..config import Settings
from ..control.controller import Controller
from ..control.worker import Worker
from ..gateway.server import GatewayServer
from ..gcheap import freeze_heap
from ..store import MetaStore, open_store
from .controller import add_common_flags
from .gateway import add_gateway_flags, gateway_settings
from .worker import add_worker_flags, node_name, worker_settings

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "up",
        help="run store + controller + worker in one process (a one-machine cluster)",
        description="Run a single-machine cluster in the foreground until SIGTERM or Ctrl-C.",
    )
    add_common_flags(parser)
    add_worker_flags(parser)
    add_gateway_flags(parser, prefix="gateway-")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    settings = worker_settings(args)
    api_keys = gateway_settings(args, settings)
    node = node_name(args.node)
    logs.setup(args.log_format)
    aio.run(_serve(settings, node=node, advertise_host=args.advertise_host, api_keys=api_keys))
    return 0


@contextlib.asynccontextmanager
async def _services(
    store: MetaStore, settings: Settings, *, node: str, advertise_host: str, api_keys: list[str]
) -> AsyncIterator[None]:
    """Start every service; on exit stop them in reverse order (the worker drains first)."""
    controller = Controller(store, settings=settings.scheduler)
    running = asyncio.create_task(controller.run())
    try:
        worker = Worker(store, node_id=node, settings=settings, advertise_host=advertise_host)
        await worker.start()
        try:
            gateway = GatewayServer(store, settings=settings, api_keys=api_keys)
            gateway.app.state.log_source = worker  # GET /v1/engines/{id}/logs
            await gateway.start()
            log.info("up: gateway on %s", gateway.url)
            try:
                yield
            finally:
                await gateway.stop()
        finally:
            await worker.stop()
    finally:
        await controller.stop()
        await asyncio.gather(running, return_exceptions=True)


async def _serve(
    settings: Settings, *, node: str, advertise_host: str, api_keys: list[str]
) -> None:
    store = open_store(settings.storage.url, **settings.storage.store_options())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with _services(
            store, settings, node=node, advertise_host=advertise_host, api_keys=api_keys
        ):
            log.info(
                "up: store %s, controller and worker %s running",
                store.url,
                node,
                extra={"node": node},
            )
            freeze_heap()
            await stop.wait()
            store.fail_fast()  # etcd may be what went away: stop in seconds, not minutes
    finally:
        await store.close()
