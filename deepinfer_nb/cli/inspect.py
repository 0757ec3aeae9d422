"""`deepinfer-nb ls | status NAME | gpus`: read the cluster through a gateway.

    deepinfer-nb ls            deployments, then their engines
    deepinfer-nb status NAME   one deployment: spec summary, state, engines
    deepinfer-nb gpus          GPUs per node (or why a node has none)

Tables are the notebook's (`client.render`); `-o json|yaml` prints the gateway's own views.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..client.render import (
    ENGINE_COLUMNS,
    GPU_COLUMNS,
    engine_rows,
    gpu_rows,
    text_table,
)
from ..client.view import status_of
from . import snapshot
from .output import add_output_flag, emit
from .remote import Gateway, add_client_flags

DEPLOYMENT_COLUMNS = ["name", "model", "status", "replicas", "device", "served as"]


def register(sub: Any) -> None:
    p = sub.add_parser("ls", help="list deployments and their engines")
    _common(p, _ls)
    p = sub.add_parser("status", help="one deployment: its state and engines")
    p.add_argument("name")
    _common(p, _status)
    p = sub.add_parser("gpus", help="GPUs per node (or why a node has none)")
    _common(p, _gpus)


def _common(p: argparse.ArgumentParser, func: Any) -> None:
    add_client_flags(p)
    add_output_flag(p)
    p.set_defaults(func=func)


def deployment_rows(views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for view in views:
        snap = snapshot.of_deployment(view)
        rows.append(
            {
                "name": view["name"],
                "model": view["model"],
                "status": status_of(snap, view["name"]),
                "replicas": f"{view['ready_replicas']}/{view['replicas']}",
                "device": view["device"],
                "served as": view["model_name"],
            }
        )
    return rows


def deployment_table(view: dict[str, Any]) -> str:
    """One deployment as people read it: a summary line, its message, its engines."""
    snap = snapshot.of_deployment(view)
    name = view["name"]
    lines = [f"Deployment {name!r}: {view['model']} · {status_of(snap, name)}"]
    lines.append(
        f"served as {view['model_name']!r} · replicas {view['replicas']} · device "
        f"{view['device']} · tensor parallel {view['tensor_parallel_size']}"
    )
    if view.get("message"):
        lines.append(view["message"])
    rows = engine_rows(snap, name)
    if rows:
        lines.append(text_table(rows, ENGINE_COLUMNS, empty=""))
    return "\n".join(lines)


def _ls(args: argparse.Namespace) -> int:
    gw = Gateway.from_args(args)
    views = gw.get("/v1/deployments")["data"]
    engines = gw.get("/v1/engines")["data"]
    data = {"deployments": views, "engines": engines}

    def human(d: dict[str, Any]) -> str:
        snap = snapshot.snapshot(engines=d["engines"])
        deps = text_table(deployment_rows(d["deployments"]), DEPLOYMENT_COLUMNS, empty="")
        if not deps:
            return "no deployments (create one: deepinfer-nb deploy MODEL)"
        return deps + "\n\n" + text_table(engine_rows(snap), ENGINE_COLUMNS, empty="no engines")

    emit(data, args.output, human)
    return 0


def _status(args: argparse.Namespace) -> int:
    view = Gateway.from_args(args).get(f"/v1/deployments/{args.name}")
    emit(view, args.output, deployment_table)
    return 0


def _gpus(args: argparse.Namespace) -> int:
    gw = Gateway.from_args(args)
    data = {"nodes": gw.get("/v1/nodes")["data"], "gpus": gw.get("/v1/gpus")["data"]}

    def human(d: dict[str, Any]) -> str:
        snap = snapshot.snapshot(nodes=d["nodes"], gpus=d["gpus"])
        return text_table(gpu_rows(snap), GPU_COLUMNS, empty="no nodes registered")

    emit(data, args.output, human)
    return 0
