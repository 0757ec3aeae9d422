"""`deepinfer-nb etcd`: run a local etcd for durability and remote workers, no set-up by hand.

    deepinfer-nb etcd [--listen ADDR] [--tls [--san HOST]...]   # foreground until Ctrl-C
    deepinfer-nb etcd-cert NAME [--out DIR]                      # a client certificate to hand out

Data lives under the user's deepinfer directory (`config.home_dir()/etcd`); it listens on loopback
unless `--listen` says otherwise. It runs in the foreground until Ctrl-C or SIGTERM, which stop
the server; if the command is killed outright, the server dies with it (parent-death signal), so
the next start on the same data directory finds its port free.

`--tls` makes a private CA and a server certificate under `config.home_dir()/etcd-tls` (once) and
starts etcd with TLS and client-certificate authentication: only holders of a certificate from
that CA get in. It also issues this machine's own client certificate ("local") and prints the
settings that use it. `etcd-cert NAME` issues one for a worker or gateway elsewhere, into a
folder to copy there.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import config
from ..errors import StoreUnavailableError
from ..services import ServiceSet, run_until_signalled, serve_until_signalled
from ..store.local_etcd import LocalEtcd

if TYPE_CHECKING:
    from ..store.certs import CertFiles

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def tls_dir() -> Path:
    return config.home_dir() / "etcd-tls"


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
        "remote workers: use --tls with it)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve TLS only and require client certificates (made under DEEPINFER_HOME/etcd-tls)",
    )
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="HOST",
        help="another name or IP the server certificate must carry (repeatable)",
    )
    parser.set_defaults(func=_run)

    cert = sub.add_parser(
        "etcd-cert",
        help="issue a client certificate for the TLS etcd (to hand to a worker or gateway)",
        description="Issue a client certificate signed by the CA of `deepinfer-nb etcd --tls`.",
    )
    cert.add_argument("name", help="the component's name (certificate CN), e.g. the worker node")
    cert.add_argument(
        "--out", default=None, help="folder to write ca.pem, NAME.pem, NAME-key.pem into"
    )
    cert.set_defaults(func=_run_cert)


def _run(args: argparse.Namespace) -> int:
    return run_until_signalled(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or str(config.home_dir() / "etcd")
    tls = None
    if args.tls:
        from ..store import certs

        tls = certs.ensure_server(tls_dir(), hosts=[args.listen, *args.san])
    async with ServiceSet() as services:
        server = await services.start_local_etcd(
            data_dir,
            port=args.port,
            host=args.listen,
            peer_port=args.peer_port or args.port + 1,
            log_path=f"{data_dir}.log",
            tls=tls,
        )
        print(
            f"etcd is running: --store {server.url}\n  data: {server.data_dir}\n"
            f"  log:  {server.log_path}",
            file=sys.stderr,
        )
        _print_access(args.listen, tls)
        print("Press Ctrl-C to stop.", file=sys.stderr, flush=True)
        services.tasks.append(asyncio.create_task(_exited(server), name="etcd"))
        code = await serve_until_signalled(services)
    if code:
        status = server.process.returncode if server.process else "unknown"
        print(f"etcd exited with status {status} (log: {server.log_path})", file=sys.stderr)
    else:
        print("etcd stopped", file=sys.stderr)
    return code


def _print_access(listen: str, tls: CertFiles | None) -> None:
    """Who can get in: certificate holders only (and how), or a warning when anyone can."""
    if tls is not None:
        from ..store import certs

        local = certs.issue_client(tls_dir(), "local")
        exports = " ".join(f"{k}={v}" for k, v in local.storage_env().items())
        print(
            "  TLS with client certificates: only holders of a certificate from "
            f"{tls.ca} get in.\n  this machine's components: export {exports}\n"
            "  a worker elsewhere: deepinfer-nb etcd-cert NODE --out DIR, copy DIR there",
            file=sys.stderr,
        )
    elif listen not in LOOPBACK:
        print(
            f"  WARNING: etcd on {listen} without TLS: anyone who can reach this port can "
            "create, change and delete deployments, read engine tokens and pose as a worker. "
            "Use --tls.",
            file=sys.stderr,
        )


async def _exited(server: LocalEtcd) -> None:
    """Ends (raising) when the etcd server exits by itself."""
    if server.process is not None:
        await asyncio.to_thread(server.process.wait)
    raise StoreUnavailableError("etcd exited")


def _run_cert(args: argparse.Namespace) -> int:
    from ..store import certs

    out = Path(args.out).expanduser() if args.out else None
    files = certs.issue_client(tls_dir(), args.name, out=out)
    exports = " \\\n  ".join(f"{k}={v}" for k, v in files.storage_env().items())
    print(
        f"client certificate for {args.name}: {files.cert}\n  key: {files.key} (keep it private)"
        f"\n  CA:  {files.ca}\nCopy these three files to the machine that runs {args.name}, then:"
        f"\n  {exports} \\\n  deepinfer-nb worker --store etcd://ETCD_HOST:PORT --node {args.name}"
        "\n(paths as they are there)",
        file=sys.stderr,
    )
    return 0
