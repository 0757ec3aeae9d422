"""`deepinfer-nb controller`: run the leader-elected controller (scheduler loop) in the foreground.

Several may run against one etcd: one leads, the others stand by and take over within the leader
lease TTL. Settings come from `-c FILE`, then DEEPINFER_* variables, then these flags. SIGTERM or
Ctrl-C resigns leadership (a standby takes over at once) and exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .. import logs
from ..config import Settings
from ..services import ServiceSet, run_until_signalled, serve_until_signalled

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "controller",
        help="run the controller: places engines, scales, restarts (leader-elected)",
        description="Run the controller in the foreground until SIGTERM or Ctrl-C.",
    )
    add_common_flags(parser)
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        metavar="S",
        default=None,
        help="seconds between reconcile rounds ([scheduler] reconcile_interval_s)",
    )
    parser.add_argument(
        "--leader-ttl",
        type=int,
        metavar="S",
        default=None,
        help="leader lease TTL in seconds ([scheduler] leader_ttl_s)",
    )
    parser.add_argument("--identity", default="", help="name in the leader key (default: host:pid)")
    parser.set_defaults(func=_run)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        metavar="URL",
        default=None,
        help="etcd://HOST:PORT[,HOST:PORT] or memory:// (default: [storage])",
    )
    parser.add_argument("-c", "--config", metavar="FILE", default=None, help="TOML settings file")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")


def settings_from(args: argparse.Namespace) -> Settings:
    """Defaults < file < environment < flags."""
    settings = Settings.load(args.config)
    for line in settings.notes:
        print(f"deepinfer-nb: note: {line}", file=sys.stderr)
    if args.store:
        settings.storage.use_url(args.store)
    if getattr(args, "reconcile_interval", None) is not None:
        settings.set(
            "scheduler",
            "reconcile_interval_s",
            args.reconcile_interval,
            source="--reconcile-interval",
        )
    if getattr(args, "leader_ttl", None) is not None:
        settings.set("scheduler", "leader_ttl_s", args.leader_ttl, source="--leader-ttl")
    return settings


def _run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    logs.setup(args.log_format)
    if settings.storage.backend == "memory":
        log.warning(
            "memory:// store: only this process sees it; workers cannot join "
            "(use etcd://HOST:PORT, or `deepinfer-nb up` for one machine)"
        )
    return run_until_signalled(_serve(settings, identity=args.identity))


async def _serve(settings: Settings, *, identity: str) -> int:
    async with ServiceSet(settings) as services:
        store = await services.open_store()
        controller = await services.start_controller(identity=identity)
        return await serve_until_signalled(
            services, ready=f"controller {controller.identity} on {store.url}"
        )
