"""`deepinfer-nb gateway`: run the OpenAI-compatible gateway in the foreground.

    deepinfer-nb gateway --store etcd://HOST:2379 --host 127.0.0.1 --port 8082 [--api-key-env VAR]

It serves whatever the store's deployments run (the controller and workers run elsewhere).
Binding anything but loopback requires an API key: `--api-key-env VAR` names a variable of keys
with both scopes (comma-separated); [server] admin_keys_env / inference_keys_env / keys_file
configure named admin and inference keys (see the README's "Security model").
SIGTERM or Ctrl-C stops it gracefully.
`add_gateway_flags` / `gateway_settings` are shared with `up` and `serve`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .. import logs
from ..config import ApiKey, Settings, read_keys
from ..gateway.security import check_bind, describe_keys
from ..services import ServiceSet, run_until_signalled, serve_until_signalled
from .controller import add_common_flags, settings_from

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "gateway",
        help="run the OpenAI-compatible gateway over a cluster's store",
        description="Serve /v1/chat/completions, /v1/completions, /v1/embeddings, "
        "/v1/models, /v1/deployments, /v1/engines, /health and /metrics.",
    )
    add_common_flags(parser)
    add_gateway_flags(parser)
    parser.set_defaults(func=_run)


def add_gateway_flags(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """--host/--port/--api-key-env (with `prefix`, e.g. --gateway-host, where a command has
    other hosts and ports)."""
    parser.add_argument(
        f"--{prefix}host",
        dest="gateway_host",
        metavar="HOST",
        default=None,
        help="gateway bind address (default 127.0.0.1; others need an API key)",
    )
    parser.add_argument(
        f"--{prefix}port",
        dest="gateway_port",
        metavar="PORT",
        type=int,
        default=None,
        help="gateway port (default 8082; 0 picks a free one)",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        default=None,
        help="environment variable holding gateway API key(s) with both scopes, comma-separated",
    )


def gateway_settings(args: argparse.Namespace, settings: Settings) -> list[ApiKey]:
    """Apply the gateway flags to `settings`; returns the API keys. Refuses a non-loopback
    bind without a key before anything starts."""
    for flag, key in (
        ("gateway_host", "host"),
        ("gateway_port", "port"),
        ("api_key_env", "api_key_env"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            settings.set("server", key, value, source="--" + flag.replace("_", "-"))
    keys = read_keys(settings.server)
    check_bind(settings.server.host, keys)
    return keys


def _run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    keys = gateway_settings(args, settings)
    logs.setup(args.log_format)
    if settings.storage.backend == "memory":
        log.warning(
            "memory:// store: only this process sees it, so no engine will ever run "
            "behind this gateway (use etcd://HOST:PORT, or `deepinfer-nb up`)"
        )
    return run_until_signalled(_serve(settings, api_keys=keys))


async def _serve(settings: Settings, *, api_keys: list[ApiKey]) -> int:
    async with ServiceSet(settings) as services:
        store = await services.open_store()
        gateway = await services.start_gateway(api_keys=api_keys, log_level="info")
        auth = describe_keys(api_keys)
        # stderr, not the log: scripts wait for this line
        print(
            f"deepinfer-nb gateway on {gateway.url} (store {store.url}, {auth})",
            file=sys.stderr,
            flush=True,
        )
        return await serve_until_signalled(services)
