"""`deepinfer-nb up`: a whole single-machine cluster in one process.

    deepinfer-nb up [--store memory://|etcd://HOST:PORT] [--node NAME] [-c config.toml]

Runs the store client (the embedded memory:// store by default), the controller and one worker
on one asyncio loop until SIGTERM or Ctrl-C, then stops them in reverse order: the worker drains
its engines first, then the controller resigns, then the store closes. Services are started in
`_services()`, the one place to add more (the gateway).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from .. import logs
from ..config import Settings
from ..control.controller import Controller
from ..control.worker import Worker
from ..store import MetaStore, open_store
from .controller import add_common_flags
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
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    settings = worker_settings(args)
    node = node_name(args.node)
    logs.setup(args.log_format)
    asyncio.run(_serve(settings, node=node, advertise_host=args.advertise_host))
    return 0


@contextlib.asynccontextmanager
async def _services(store: MetaStore, settings: Settings, *, node: str,
                    advertise_host: str) -> AsyncIterator[None]:
    """Start every service; on exit stop them in reverse order (the worker drains first)."""
    controller = Controller(store, settings=settings.scheduler)
    running = asyncio.create_task(controller.run())
    try:
        worker = Worker(store, node_id=node, settings=settings, advertise_host=advertise_host)
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()
    finally:
        await controller.stop()
        await asyncio.gather(running, return_exceptions=True)


async def _serve(settings: Settings, *, node: str, advertise_host: str) -> None:
    store = open_store(settings.storage.url, **settings.storage.store_options())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with _services(store, settings, node=node, advertise_host=advertise_host):
            log.info("up: store %s, controller and worker %s running", store.url, node,
                     extra={"node": node})
            await stop.wait()
    finally:
        await store.close()
