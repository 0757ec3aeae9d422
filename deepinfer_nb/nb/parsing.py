"""Argument parsing for `%deepinfer SUBCOMMAND ...`: shlex + one argparse parser per subcommand.

Parse errors become short `UsageError`s (no traceback, no SystemExit) that name the usage line.
The line is split with shlex, never `{}`-interpolated, so prompts and paths pass through as typed.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError

HELP = """\
%deepinfer up [--store memory://|etcd|etcd://H:P] [--gateway-port N] [--no-worker] [--node ID]
%deepinfer deploy MODEL [--name N] [--gpus N] [--replicas R] [--device auto|cpu|cuda|cuda:N]
                        [--task auto|generate|embed] [--tool-call-parser NAME]
                        [--wait] [--timeout S] [-- extra vLLM args]
%deepinfer ls                      deployments and their engines
%deepinfer status [NAME]           one deployment (or the cluster)
%deepinfer logs NAME [--lines N]   engine logs (engines on this kernel's worker)
%deepinfer stop NAME | rm NAME     stop the deployment's engines and remove it
%deepinfer scale NAME R [--wait]   change the number of replicas
%deepinfer gpus                    GPUs per node (or why a node has none)
%deepinfer monitor [--gpus]        live engine (and GPU) monitor widget
%deepinfer gateway [url|start|stop] [--port N]
%deepinfer snippet NAME [--lang python|curl]
%deepinfer doctor                  check the environment
%deepinfer down                    stop everything this kernel started
%deepinfer help                    this list
%%deepinfer chat NAME [--system S] [--max-tokens K] [--temperature T] [--new]
"""

COMMANDS = [
    "up",
    "deploy",
    "ls",
    "status",
    "logs",
    "stop",
    "rm",
    "scale",
    "gpus",
    "monitor",
    "gateway",
    "snippet",
    "doctor",
    "down",
    "help",
    "chat",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\nusage: {self.format_usage().strip()[7:]}  (%deepinfer help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or self.format_help())


def _parser(name: str) -> _Parser:
    return _Parser(prog=f"%deepinfer {name}", add_help=False, allow_abbrev=False)


def _build() -> dict[str, _Parser]:
    p: dict[str, _Parser] = {}
    up = p["up"] = _parser("up")
    up.add_argument("--store", default=None)
    up.add_argument("--gateway-port", type=int, default=None)
    up.add_argument("--no-gateway", action="store_true")
    up.add_argument("--no-worker", action="store_true")
    up.add_argument("--node", default=None)

    dep = p["deploy"] = _parser("deploy")
    dep.add_argument("model")
    dep.add_argument("--name", default=None)
    dep.add_argument("--gpus", type=int, default=0)
    dep.add_argument("--replicas", type=int, default=1)
    dep.add_argument("--device", default=None)
    dep.add_argument("--task", default=None, choices=["auto", "generate", "embed"])
    dep.add_argument("--tool-call-parser", default=None)
    dep.add_argument("--wait", action="store_true")
    dep.add_argument("--timeout", type=float, default=None)

    p["ls"] = _parser("ls")
    st = p["status"] = _parser("status")
    st.add_argument("name", nargs="?")
    lg = p["logs"] = _parser("logs")
    lg.add_argument("name")
    lg.add_argument("--lines", type=int, default=50)
    for cmd in ("stop", "rm"):
        p[cmd] = _parser(cmd)
        p[cmd].add_argument("name")
    sc = p["scale"] = _parser("scale")
    sc.add_argument("name")
    sc.add_argument("replicas", type=int)
    sc.add_argument("--wait", action="store_true")
    p["gpus"] = _parser("gpus")
    mon = p["monitor"] = _parser("monitor")
    mon.add_argument("--gpus", action="store_true")
    gw = p["gateway"] = _parser("gateway")
    gw.add_argument("action", nargs="?", default="url", choices=["url", "start", "stop"])
    gw.add_argument("--port", type=int, default=None)
    sn = p["snippet"] = _parser("snippet")
    sn.add_argument("name")
    sn.add_argument("--lang", default="python", choices=["python", "curl"])
    p["doctor"] = _parser("doctor")
    p["down"] = _parser("down")
    p["help"] = _parser("help")
    ch = p["chat"] = _parser("chat")
    ch.add_argument("name")
    ch.add_argument("--system", default=None)
    ch.add_argument("--max-tokens", type=int, default=None)
    ch.add_argument("--temperature", type=float, default=None)
    ch.add_argument("--new", action="store_true")
    return p


PARSERS = _build()


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
