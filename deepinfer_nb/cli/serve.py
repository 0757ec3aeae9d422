"""`deepinfer-nb serve -c FILE`: the control plane of a multi-machine cluster in one process.

    deepinfer-nb serve -c cluster.toml [--store etcd://HOST:2379] [--gateway-port 8082]

Runs the leader-elected controller and the OpenAI gateway over one store (etcd, so that workers
on other hosts join with `deepinfer-nb worker --store ...`) until SIGTERM or Ctrl-C; then the
gateway stops, the controller resigns and the store closes.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from .. import logs
from ..config import ApiKey, Settings
from ..services import ServiceSet, run_until_signalled, serve_until_signalled
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
    return run_until_signalled(_serve(settings, api_keys=api_keys))


async def _serve(settings: Settings, *, api_keys: list[ApiKey]) -> int:
    async with ServiceSet(settings) as services:
        store = await services.open_store()
        controller = await services.start_controller()
        gateway = await services.start_gateway(api_keys=api_keys)
        return await serve_until_signalled(
            services,
            ready=f"serve: controller {controller.identity} and gateway on {gateway.url} "
            f"(store {store.url})",
        )
