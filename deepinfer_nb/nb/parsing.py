"""Argument parsing for `%deepinfer SUBCOMMAND ...`: shlex + one argparse parser per subcommand.

`COMMAND_TABLE` is the one list of subcommands: the parsers, the command list and the help text
(`%deepinfer help`, and `%deepinfer?` through the magic's docstring) are all made from it.

Parse errors become short `UsageError`s (no traceback, no SystemExit) that name the usage line.
The line is split with shlex, never `{}`-interpolated, so prompts and paths pass through as typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argparse argument: `add_argument(*flags, **options)`."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its arguments, one line of help, and what its usage line adds."""

    name: str
    summary: str
    args: tuple[Arg, ...] = ()
    tail: str = ""
    """Usage text argparse does not draw (deploy's `-- extra engine args`)."""
    cell: bool = False
    """A cell magic (`%%deepinfer NAME`): the cell body is its input."""


NAME = arg("name")
PORT = arg("--port", type=int, default=None, metavar="N")

COMMAND_TABLE: tuple[Command, ...] = (
    Command(
        "up",
        "start the store client, controller, worker and gateway in this kernel",
        (
            arg("--store", default=None, metavar="memory://|etcd|etcd://H:P"),
            arg("--gateway-port", type=int, default=None, metavar="N"),
            arg("--no-gateway", action="store_true"),
            arg("--no-worker", action="store_true"),
            arg("--node", default=None, metavar="ID"),
        ),
    ),
    Command(
        "deploy",
        "create (or update) a deployment; the same name again is the same deployment",
        (
            arg("model"),
            arg("--name", default=None, metavar="N"),
            arg("--gpus", type=int, default=0, metavar="N"),
            arg("--replicas", type=int, default=1, metavar="R"),
            arg("--device", default=None, metavar="auto|cpu|cuda|cuda:N"),
            arg("--engine", default=None, choices=["vllm", "llama.cpp", "auto"]),
            arg("--task", default=None, choices=["auto", "generate", "embed"]),
            arg("--tool-call-parser", default=None, metavar="NAME"),
            arg("--idle-timeout", default=None, metavar="30s|15m|1h"),
            arg("--wait", action="store_true"),
            arg("--timeout", type=float, default=None, metavar="S"),
        ),
        tail="[-- extra engine args]",
    ),
    Command("ls", "deployments and their engines"),
    Command("status", "one deployment (or the cluster)", (arg("name", nargs="?"),)),
    Command(
        "logs",
        "engine logs (engines on this kernel's worker)",
        (NAME, arg("--lines", type=int, default=50, metavar="N")),
    ),
    Command("stop", "stop the deployment's engines and remove it", (NAME,)),
    Command("rm", "the same as stop", (NAME,)),
    Command(
        "scale",
        "change the number of replicas",
        (NAME, arg("replicas", type=int), arg("--wait", action="store_true")),
    ),
    Command(
        "rollback",
        "back to the settings before the last change (the engines roll)",
        (NAME, arg("--wait", action="store_true")),
    ),
    Command(
        "restart",
        "replace every engine, one at a time (no outage)",
        (NAME, arg("--wait", action="store_true")),
    ),
    Command(
        "export",
        "deployments as a file `deepinfer-nb apply -f` accepts",
        (arg("file", nargs="?", default=None, metavar="FILE"),),
    ),
    Command("gpus", "GPUs per node (or why a node has none)"),
    Command(
        "monitor", "live engine (and GPU) monitor widget", (arg("--gpus", action="store_true"),)
    ),
    Command(
        "gateway",
        "the gateway's address for your browser, external clients and this kernel (with the auth "
        "each needs); start or stop it",
        (arg("action", nargs="?", default="url", choices=["url", "start", "stop"]), PORT),
    ),
    Command(
        "snippet",
        "client code for a deployment through the gateway",
        (NAME, arg("--lang", default="python", choices=["python", "curl"])),
    ),
    Command("doctor", "check the environment"),
    Command("down", "stop everything this kernel started"),
    Command("help", "this list"),
    Command(
        "chat",
        "chat with a deployment; the cell body is the prompt (streams the answer)",
        (
            NAME,
            arg("--system", default=None, metavar="S"),
            arg("--max-tokens", type=int, default=None, metavar="K"),
            arg("--temperature", type=float, default=None, metavar="T"),
            arg("--new", action="store_true"),
        ),
        cell=True,
    ),
)

COMMANDS = [c.name for c in COMMAND_TABLE]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\nusage: {self.format_usage().strip()[7:]}  (%deepinfer help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or self.format_help())


def _parser(command: Command) -> _Parser:
    prefix = "%%deepinfer" if command.cell else "%deepinfer"
    parser = _Parser(
        prog=f"{prefix} {command.name}",
        add_help=False,
        allow_abbrev=False,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100),
    )
    for a in command.args:
        parser.add_argument(*a.flags, **a.options)
    return parser


PARSERS = {c.name: _parser(c) for c in COMMAND_TABLE}


def _usage(a: Arg) -> str:
    """`NAME`, `[NAME]`, `[--flag]` or `[--flag METAVAR]` (choices as a|b|c)."""
    choices = a.options.get("choices")
    metavar = "|".join(choices) if choices else a.options.get("metavar", a.flags[0].upper())
    if not a.flags[0].startswith("-"):
        return f"[{metavar}]" if a.options.get("nargs") == "?" else metavar
    if a.options.get("action") == "store_true":
        return f"[{a.flags[0]}]"
    return f"[{a.flags[0]} {metavar}]"


def _help() -> str:
    lines = []
    for c in COMMAND_TABLE:
        prefix = "%%deepinfer" if c.cell else "%deepinfer"
        lines.append(" ".join([prefix, c.name, *map(_usage, c.args), c.tail]).rstrip())
        lines.append(f"    {c.summary}")
    return "\n".join(lines) + "\n"


HELP = _help()
"""`%deepinfer help` and `%deepinfer?`: every subcommand's usage and summary, from the table."""


def parse(line: str) -> tuple[str, argparse.Namespace]:
    """`(subcommand, namespace)`; deploy's args after `--` are in `ns.extra`."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse arguments: {exc}") from None
    if not words:
        raise UsageError("missing subcommand; %deepinfer help lists them")
    cmd, rest = words[0], words[1:]
    if cmd in ("-h", "--help"):
        cmd = "help"
    if cmd not in PARSERS:
        raise UsageError(f"unknown subcommand {cmd!r}; one of: {', '.join(COMMANDS)}")
    extra: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, extra = rest[:i], rest[i + 1 :]
        if cmd != "deploy":
            raise UsageError(f"'--' passes engine arguments and only works with deploy, not {cmd}")
    ns = PARSERS[cmd].parse_args(rest)
    ns.extra = extra
    _check(cmd, ns)
    return cmd, ns


def _check(cmd: str, ns: Any) -> None:
    if cmd in ("deploy", "scale") and ns.replicas < 0:
        raise UsageError("--replicas must be >= 0")
    if cmd == "deploy" and ns.gpus < 0:
        raise UsageError("--gpus must be >= 0")
    if cmd == "chat" and ns.max_tokens is not None and ns.max_tokens < 1:
        raise UsageError("--max-tokens must be >= 1")
    port = getattr(ns, "gateway_port", None) if cmd == "up" else getattr(ns, "port", None)
    if port is not None and not 0 <= port <= 65535:
        raise UsageError("port must be between 0 and 65535 (0 picks a free one)")
