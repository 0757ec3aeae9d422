"""The `deepinfer-nb` command line: one module per subcommand group.

Each module in `COMMANDS` defines `register(subparsers)`, which adds its parser(s) and sets
`func` (taking the parsed args, returning an exit code) as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import procenv
from ..errors import DeepInferError

COMMANDS = ["models", "demo", "etcd", "controller", "gateway", "worker", "up", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepinfer-nb", description="Deploy and use LLMs from notebooks and the shell."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    procenv.apply_grpc_experiments()  # our own process: before any command imports grpc
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DeepInferError as exc:
        print(f"deepinfer-nb: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
