"""`deepinfer-nb logs NAME [-f] [--engine ID] [--lines N]`: a deployment's engine output.

Reads `GET /v1/engines/{id}/logs` (served by a gateway that runs beside the engine's worker,
as `deepinfer-nb up` does). Several engines: each block is headed `==> ID (STATE on NODE) <==`,
as the notebook's `%deepinfer logs` prints it. `-f` keeps polling and prints new lines as they
are written, prefixed by the engine id when there are several, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .output import add_output_flag, emit
from .remote import CommandError, Gateway, add_client_flags

FOLLOW_POLL_S = 1.0


def register(sub: Any) -> None:
    p = sub.add_parser("logs", help="a deployment's engine logs")
    p.add_argument("name")
    p.add_argument("--engine", default=None, metavar="ID", help="only this engine")
    p.add_argument("--lines", "-n", type=int, default=100, help="lines per engine (default 100)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    add_client_flags(p)
    add_output_flag(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    gw = Gateway.from_args(args)
    engines = _engines(gw, args.name, args.engine)
    logs = {e["id"]: gw.get(f"/v1/engines/{e['id']}/logs", lines=args.lines) for e in engines}

    def human(data: dict[str, Any]) -> str:
        blocks = []
        for e in engines:
            blocks.append(f"==> {e['id']} ({e['state']} on {e['node'] or '-'}) <==")
            blocks.append("\n".join(data[e["id"]]["lines"]) or "(no log output yet)")
        return "\n".join(blocks)

    emit(logs, args.output, human)
    if args.follow:
        _follow(gw, {eid: log["offset"] for eid, log in logs.items()})
    return 0


def _engines(gw: Gateway, name: str, only: str | None) -> list[dict[str, Any]]:
    gw.get(f"/v1/deployments/{name}")  # a missing deployment is its own error, with a hint
    engines: list[dict[str, Any]] = gw.get("/v1/engines", deployment=name)["data"]
    if only is not None:
        engines = [e for e in engines if e["id"] == only]
        if not engines:
            raise CommandError(
                f"{name} has no engine {only}; `deepinfer-nb status {name}` lists its engines"
            )
    if not engines:
        raise CommandError(f"{name} has no engines yet; `deepinfer-nb status {name}` shows why")
    return engines


def _follow(gw: Gateway, offsets: dict[str, int]) -> None:
    prefix = len(offsets) > 1
    while True:
        time.sleep(FOLLOW_POLL_S)
        for eid, offset in offsets.items():
            log = gw.get(f"/v1/engines/{eid}/logs", offset=offset)
            offsets[eid] = log["offset"]
            for line in log["lines"]:
                print(f"[{eid}] {line}" if prefix else line, flush=True)
