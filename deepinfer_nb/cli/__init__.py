"""The `deepinfer-nb` command line: one module per subcommand group.

Each module in `COMMANDS` defines `register(subparsers)`, which adds its parser(s) and sets
`func` (taking the parsed args, returning an exit code) as the parser default.

Exit codes: 0 ok, 1 failed, 2 usage (bad arguments), 130 interrupted. Every error is one line
on stderr that says what to do next.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import procenv
from ..errors import DeepInferError

COMMANDS = [
    "models",
    "demo",
    "etcd",
    "controller",
    "gateway",
    "worker",
    "up",
    "serve",
    "deploy",
    "inspect",
    "logs",
    "chat",
    "apply",
]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) that point at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        print(f"deepinfer-nb: error: {'; '.join(lines)}", file=sys.stderr)
        return int(getattr(exc, "code", 1))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
