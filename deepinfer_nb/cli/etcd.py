"""`deepinfer-nb etcd`: run a local etcd for durability and remote workers, no set-up by hand.

Data lives under the user's deepinfer directory (`config.home_dir()/etcd`); it listens on loopback
unless `--listen` says otherwise. It runs in the foreground until Ctrl-C or SIGTERM, which stop
the server; if the command is killed outright, the server dies with it (parent-death signal), so
the next start on the same data directory finds its port free.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from .. import config, procenv
from ..errors import StoreUnavailableError
from ..services import ServiceSet, serve_until_signalled
from ..store.local_etcd import LocalEtcd


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "etcd",
        help="run a local etcd server (data under the deepinfer directory)",
        description="Run a single-member etcd server in the foreground until Ctrl-C or SIGTERM.",
    )
    parser.add_argument(
        "--data-dir", default=None, help="etcd data directory (default: DEEPINFER_HOME/etcd)"
    )
    parser.add_argument("--port", type=int, default=2379, help="client port (default 2379)")
    parser.add_argument(
        "--peer-port", type=int, default=0, help="peer port on loopback (default: client port + 1)"
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1",
        metavar="ADDR",
        help="address to listen on (default loopback; 0.0.0.0 exposes it to "
        "remote workers, without TLS or auth)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return procenv.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or str(config.home_dir() / "etcd")
    async with ServiceSet() as services:
        server = await services.start_local_etcd(
            data_dir,
            port=args.port,
            host=args.listen,
            peer_port=args.peer_port or args.port + 1,
            log_path=f"{data_dir}.log",
        )
        print(
            f"etcd is running: --store {server.url}\n  data: {server.data_dir}\n"
            f"  log:  {server.log_path}\nPress Ctrl-C to stop.",
            file=sys.stderr,
            flush=True,
        )
        services.tasks.append(asyncio.create_task(_exited(server), name="etcd"))
        code = await serve_until_signalled(services)
    if code:
        status = server.process.returncode if server.process else "unknown"
        print(f"etcd exited with status {status} (log: {server.log_path})", file=sys.stderr)
    else:
        print("etcd stopped", file=sys.stderr)
    return code


async def _exited(server: LocalEtcd) -> None:
    """Ends (raising) when the etcd server exits by itself."""
    if server.process is not None:
        await asyncio.to_thread(server.process.wait)
    raise StoreUnavailableError("etcd exited")
