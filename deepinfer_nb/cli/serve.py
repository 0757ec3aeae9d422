"""`deepinfer-nb serve -c FILE`: the control plane of a multi-machine cluster in one process.

    deepinfer-nb serve -c cluster.toml [--store etcd://HOST:2379] [--gateway-port 8082]

Runs the leader-elected controller and the OpenAI gateway over one store (etcd, so that workers
on other hosts join with `deepinfer-nb worker --store ...`) until SIGTERM or Ctrl-C; then the
gateway stops, the controller resigns and the store closes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from .. import aio, logs
from ..config import ApiKey, Settings
from ..control.controller import Controller
from ..gateway.server import GatewayServer
from ..gcheap import freeze_heap
from ..store import open_store
from .controller import add_common_flags, settings_from
from .gateway import add_gateway_flags, gateway_settings

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the controller and the gateway (workers join from other hosts)",
        description="Run controller + gateway in the foreground until SIGTERM or Ctrl-C.",
    )
    add_common_flags(parser)
    add_gateway_flags(parser, prefix="gateway-")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    api_keys = gateway_settings(args, settings)
    logs.setup(args.log_format)
    if settings.storage.backend == "memory":
        log.warning(
            "memory:// store: no worker can join this process (use etcd://HOST:PORT, "
            "or `deepinfer-nb up` for one machine)"
        )
    aio.run(_serve(settings, api_keys=api_keys))
    return 0


async def _serve(settings: Settings, *, api_keys: list[ApiKey]) -> None:
    store = open_store(settings.storage.url, **settings.storage.store_options())
    controller = Controller(store, settings=settings.scheduler)
    running = asyncio.create_task(controller.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        gateway = GatewayServer(store, settings=settings, api_keys=api_keys)
        await gateway.start()
        log.info(
            "serve: controller %s and gateway on %s (store %s)",
            controller.identity,
            gateway.url,
            store.url,
        )
        freeze_heap()
        try:
            await stop.wait()
        finally:
            await gateway.stop()
    finally:
        await controller.stop()
        await asyncio.gather(running, return_exceptions=True)
        await store.close()
