"""`deepinfer-nb deploy | scale | rollback | restart | stop | rm`: change deployments.

    deepinfer-nb deploy MODEL [--name N] [--replicas R] [--device D] [--gpus G]
                        [--task auto|generate|embed] [--tool-call-parser NAME]
                        [--idle-timeout 30s|15m|1h]
                        [--engine-arg KEY[=VALUE]]... [--wait [--timeout S]]
    deepinfer-nb scale NAME REPLICAS [--wait]
    deepinfer-nb rollback NAME [--wait]   |   deepinfer-nb restart NAME [--wait]
    deepinfer-nb stop NAME   (rm NAME is the same)

The deployment spec is built exactly as the notebook's `%deepinfer deploy` builds it
(`client.cluster.build_spec`: CPU defaults, --gpus as tensor parallel, engine args that name a
spec field go to that field, the rest become vLLM flags), then POSTed: an existing deployment
with other settings is updated (its engines roll). `--wait` shows the notebook's stages
(Pending -> Scheduled -> Starting -> Running, with Downloading before Starting for a hub model
not in this host's cache) on stderr as they change; for an update, rollback
or restart it follows the rollout until every replica runs the new settings.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..client.cluster import DeploymentError, Waiter, build_spec
from ..client.render import progress_text
from ..client.view import may_download, stages
from ..config import Settings
from ..control import specfile
from ..models import Engine
from . import snapshot
from .inspect import deployment_table
from .output import add_output_flag, emit, note
from .remote import EXIT_USAGE, CommandError, Gateway, add_client_flags

POLL_S = 0.5
STOP_WAIT_S = 60.0


def register(sub: Any) -> None:
    p = sub.add_parser("deploy", help="create a deployment (idempotent by name)")
    p.add_argument("model", help="hub id, local folder or local model alias")
    p.add_argument("--name", default=None, help="deployment name (default: from the model)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per replica (tensor parallel)")
    p.add_argument(
        "--task",
        default=None,
        choices=["auto", "generate", "embed"],
        help="generate (chat, completions) or embed (embeddings); auto: what the model is",
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        metavar="NAME",
        help="vLLM tool parser for tool_choice auto (hermes, llama3_json, ...; none: no parser)",
    )
    p.add_argument(
        "--idle-timeout",
        default=None,
        metavar="DURATION",
        help="scale to zero after this long without requests (30s, 15m, 1h); the next request "
        "starts an engine again and waits for it",
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="engine setting, repeatable: max_model_len=1024, dtype=bfloat16, enforce_eager",
    )
    _wait_flags(p)
    _common(p, _deploy)

    p = sub.add_parser("scale", help="change a deployment's number of replicas")
    p.add_argument("name")
    p.add_argument("replicas", type=int)
    _wait_flags(p)
    _common(p, _scale)

    p = sub.add_parser("rollback", help="return to the engine settings before the last change")
    p.add_argument("name")
    _wait_flags(p)
    _common(p, _rollback)

    p = sub.add_parser("restart", help="replace every engine, one at a time (no outage)")
    p.add_argument("name")
    _wait_flags(p)
    _common(p, _restart)

    for verb in ("stop", "rm"):
        p = sub.add_parser(verb, help="delete a deployment; its engines stop")
        p.add_argument("name")
        p.add_argument(
            "--no-wait", action="store_true", help="return without waiting for the engines"
        )
        _common(p, _stop)


def _wait_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="block until every replica is Running")
    p.add_argument("--timeout", type=float, default=900.0, help="--wait limit in seconds")


def _common(p: argparse.ArgumentParser, func: Any) -> None:
    add_client_flags(p)
    add_output_flag(p)
    p.set_defaults(func=func)


def engine_args(items: list[str]) -> dict[str, Any]:
    """`--engine-arg` values as keyword args: "k=v" -> {"k": "v"}, a bare "k" -> {"k": True}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise CommandError(
                f"--engine-arg {item!r}: write KEY=VALUE or a bare flag KEY", code=EXIT_USAGE
            )
        out[key] = value if sep else True
    return out


def _spec_flags(args: argparse.Namespace) -> dict[str, Any]:
    """--task, --tool-call-parser and --idle-timeout as the spec fields they name (as the
    notebook passes them)."""
    flags = {
        "task": args.task,
        "tool_call_parser": args.tool_call_parser,
        "idle_timeout": args.idle_timeout,
    }
    return {key: value for key, value in flags.items() if value is not None}


def _deploy(args: argparse.Namespace) -> int:
    if args.replicas < 0 or args.gpus < 0:
        raise CommandError("--replicas and --gpus must be >= 0", code=EXIT_USAGE)
    try:
        spec = build_spec(
            args.model,
            name=args.name,
            gpus=args.gpus,
            replicas=args.replicas,
            device=args.device,
            engine_args=_spec_flags(args) | engine_args(args.engine_arg),
        )
    except DeploymentError as exc:
        raise CommandError(str(exc), code=EXIT_USAGE) from None
    body = specfile.fields(spec)  # what a user sets: no server-side fields
    gw = Gateway.from_args(args)
    view = gw.request("POST", "/v1/deployments", json=body)
    note(f"{spec.name}: {view.get('change', 'created')}")
    if args.wait and view.get("change") == "updated":
        view = wait_rolled(gw, spec.name, timeout=args.timeout)
    elif args.wait:
        view = wait_running(gw, spec.name, timeout=args.timeout)
    emit(view, args.output, deployment_table)
    return 0


def _scale(args: argparse.Namespace) -> int:
    if args.replicas < 0:
        raise CommandError("REPLICAS must be >= 0", code=EXIT_USAGE)
    gw = Gateway.from_args(args)
    view = gw.request("PATCH", f"/v1/deployments/{args.name}", json={"replicas": args.replicas})
    note(f"{args.name}: scaled to {args.replicas} replica(s)")
    if args.wait and args.replicas > 0:
        view = wait_running(gw, args.name, timeout=args.timeout)
    emit(view, args.output, deployment_table)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    return _roll(args, "rollback", "rolling back")


def _restart(args: argparse.Namespace) -> int:
    return _roll(args, "restart", "rolling restart")


def _roll(args: argparse.Namespace, action: str, what: str) -> int:
    gw = Gateway.from_args(args)
    view = gw.request("POST", f"/v1/deployments/{args.name}/{action}")
    note(f"{args.name}: {what} ({view['rollout_status']['state']})")
    if args.wait:
        view = wait_rolled(gw, args.name, timeout=args.timeout)
    emit(view, args.output, deployment_table)
    return 0


def wait_rolled(gw: Gateway, name: str, *, timeout: float) -> dict[str, Any]:
    """Poll until the rollout completes (stderr shows its progress); a halt is an error."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        view: dict[str, Any] = gw.get(f"/v1/deployments/{name}")
        state = view["rollout_status"]
        shown = (state["state"], state["updated"])
        if shown != last:
            note(f"{name}: rollout {state['state']} ({state['updated']}/{state['replicas']})")
            last = shown
        if state["state"] == "complete" and view["ready_replicas"] >= view["replicas"]:
            return view
        if state["state"] == "halted":
            raise CommandError(f"{name}: rollout halted: {state['reason']}")
        if time.monotonic() > deadline:
            raise CommandError(
                f"{name}: rollout not done after {timeout:g} s; see deepinfer-nb status {name}"
            )
        time.sleep(POLL_S)


def _stop(args: argparse.Namespace) -> int:
    gw = Gateway.from_args(args)
    result = gw.request("DELETE", f"/v1/deployments/{args.name}")
    left: list[Any] = []
    if not args.no_wait:
        deadline = time.monotonic() + STOP_WAIT_S
        while (left := gw.get("/v1/engines", deployment=args.name)["data"]) and (
            time.monotonic() < deadline
        ):
            time.sleep(POLL_S)
    if left:
        note(f"{args.name}: removed; {len(left)} engine(s) still stopping")
    else:
        note(f"{args.name}: stopped and removed")
    emit(result, args.output, lambda r: f"{r['name']} deleted")
    return 0


def wait_running(gw: Gateway, name: str, *, timeout: float) -> dict[str, Any]:
    """Poll the deployment until every replica runs, printing each stage change (stderr)."""
    view = gw.get(f"/v1/deployments/{name}")
    agent = Settings.load().agent  # this host's hub cache, as the notebook checks its own
    downloads = may_download(view["model"], view["revision"], agent)

    def progress(stage: str, elapsed: float, engines: list[Engine]) -> None:
        order = stages(engines, may_download=downloads)
        where = ", ".join(f"{e.id} on {e.node}" for e in engines if e.node)
        note(progress_text(name, stage, elapsed, order, where))

    waiter = Waiter(name, progress, command="deepinfer-nb")
    deadline = time.monotonic() + timeout
    while True:
        try:
            if waiter(snapshot.of_deployment(view)):
                break
        except DeploymentError as exc:
            raise CommandError(str(exc)) from None
        if time.monotonic() > deadline:
            raise CommandError(
                f"{name} is not Running after {timeout:g} s; see deepinfer-nb logs {name}"
            )
        time.sleep(POLL_S)
        view = gw.get(f"/v1/deployments/{name}")
    note(f"{name}: Running ({time.monotonic() - waiter.start:.1f} s) ready")
    return dict(view)
