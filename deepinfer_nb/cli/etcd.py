"""`deepinfer-nb etcd`: run a local etcd for durability and remote workers, no set-up by hand.

Data lives under the user's deepinfer directory (`config.home_dir()/etcd`); it listens on loopback
unless `--listen` says otherwise. It runs in the foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .. import config
from ..store.local_etcd import LocalEtcd


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "etcd",
        help="run a local etcd server (data under the deepinfer directory)",
        description="Run a single-member etcd server in the foreground until Ctrl-C.",
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
    data_dir = args.data_dir or str(config.home_dir() / "etcd")
    server = LocalEtcd(
        data_dir,
        port=args.port,
        host=args.listen,
        peer_port=args.peer_port or args.port + 1,
        log_path=f"{data_dir}.log",
    )
    server.start()
    print(
        f"etcd is running: --store {server.url}\n  data: {server.data_dir}\n"
        f"  log:  {server.log_path}\nPress Ctrl-C to stop.",
        file=sys.stderr,
    )
    try:
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping etcd", file=sys.stderr)
        server.stop()
        return 0
    code = server.process.returncode if server.process else 1
    print(f"etcd exited with status {code} (log: {server.log_path})", file=sys.stderr)
    return 1
