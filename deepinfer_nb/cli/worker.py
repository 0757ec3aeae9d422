"""`deepinfer-nb worker`: run a worker agent for one node in the foreground.

    deepinfer-nb worker --store etcd://HOST:2379 --node NAME [--advertise-host H]
        [--engine-python PATH] [-c config.toml] [--log-format json]

It registers the node under a lease, publishes its GPUs, and runs the engines the controller
places on it. SIGTERM or Ctrl-C drains: engines are stopped, the lease is revoked (the node
disappears at once), then it exits.
"""

from __future__ import annotations

import argparse
import logging
import re
import socket
from typing import Any

from .. import logs
from ..config import Settings
from ..errors import ConfigError
from ..models import NAME_PATTERN
from ..services import ServiceSet, run_until_signalled, serve_until_signalled
from .controller import add_common_flags, settings_from

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "worker",
        help="run a worker agent: registers a node and runs the engines placed on it",
        description="Run a worker agent in the foreground until SIGTERM or Ctrl-C (which drains).",
    )
    add_common_flags(parser)
    add_worker_flags(parser)
    parser.set_defaults(func=_run)


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-n", "--node", default=None, help="node name (default: this host's name, lower-cased)"
    )
    parser.add_argument(
        "--advertise-host",
        default="127.0.0.1",
        metavar="H",
        help="address clients use to reach this node's engines",
    )
    parser.add_argument(
        "--engine-python",
        default=None,
        metavar="PATH",
        help="Python interpreter for engine processes ([agent] engine_python)",
    )


def node_name(value: str | None) -> str:
    name = value or socket.gethostname().split(".")[0].lower()
    if not re.match(NAME_PATTERN, name):
        raise ConfigError(
            f"--node {name!r}: use lower-case letters, digits, '.', '_' or '-' "
            "(at most 63, starting and ending with a letter or digit)"
        )
    return name


def worker_settings(args: argparse.Namespace) -> Settings:
    settings = settings_from(args)
    if args.engine_python:
        settings.set("agent", "engine_python", args.engine_python, source="--engine-python")
    return settings


def _run(args: argparse.Namespace) -> int:
    settings = worker_settings(args)
    node = node_name(args.node)
    logs.setup(args.log_format)
    if settings.storage.backend == "memory":
        raise ConfigError(
            "a standalone worker needs a shared store: --store etcd://HOST:PORT "
            "(or run `deepinfer-nb up` for one machine)"
        )
    return run_until_signalled(_serve(settings, node=node, advertise_host=args.advertise_host))


async def _serve(settings: Settings, *, node: str, advertise_host: str) -> int:
    async with ServiceSet(settings) as services:
        await services.open_store()
        await services.start_worker(node=node, advertise_host=advertise_host)
        return await serve_until_signalled(services, ready=f"worker {node} running")
