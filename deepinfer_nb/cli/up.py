"""`deepinfer-nb up`: a whole single-machine cluster in one process.

    deepinfer-nb up [--store memory://|etcd://HOST:PORT] [--node NAME] [-c config.toml]
                    [--gateway-port 8082] [--gateway-host 127.0.0.1] [--api-key-env VAR]

Runs the store client (the embedded memory:// store by default), the controller, one worker and
the OpenAI gateway on one asyncio loop until SIGTERM or Ctrl-C, then stops them in the one stop
order of `services.ServiceSet`: the gateway first, then the worker drains its engines, then the
controller resigns, then the store closes.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from .. import logs
from ..config import ApiKey, Settings
from ..services import ServiceSet, run_until_signalled, serve_until_signalled
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
    return run_until_signalled(
        _serve(settings, node=node, advertise_host=args.advertise_host, api_keys=api_keys)
    )


async def _serve(
    settings: Settings, *, node: str, advertise_host: str, api_keys: list[ApiKey]
) -> int:
    async with ServiceSet(settings) as services:
        store = await services.open_store()
        await services.start_controller()
        await services.start_worker(node=node, advertise_host=advertise_host)
        gateway = await services.start_gateway(api_keys=api_keys)
        log.info("up: gateway on %s", gateway.url)
        return await serve_until_signalled(
            services,
            ready=f"up: store {store.url}, controller and worker {node} running",
        )
