"""The gateway's JSON views turned back into the notebook's `Snapshot`.

The deployment commands reuse the notebook's pure pieces (tables in `client.render`, the
`deploy --wait` check `client.cluster.Waiter`, `client.view.status_of`) on what the gateway
returns, so both entry points word states, progress and failures the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..client.view import Snapshot
from ..models import Activity, DeploymentSpec, Engine, GpuSamples, Node


def snapshot(
    *,
    deployments: Iterable[dict[str, Any]] = (),
    engines: Iterable[dict[str, Any]] = (),
    nodes: Iterable[dict[str, Any]] = (),
    gpus: Iterable[dict[str, Any]] = (),
) -> Snapshot:
    """A Snapshot from `/v1/deployments`, `/v1/engines`, `/v1/nodes` and `/v1/gpus` items."""
    views = list(deployments)
    specs = {d["name"]: spec_of(d) for d in views}
    idle = {  # the gateway decided it: an idle flag of this very deployment
        name: Activity(deployment=name, idle=True, idle_since=spec.created_at)
        for name, spec in specs.items()
        if any(d["name"] == name and d.get("idle") for d in views)
    }
    return Snapshot(
        deployments=specs,
        engines={e["id"]: Engine.model_validate(e) for e in engines},
        nodes={n["id"]: Node.model_validate(n) for n in nodes},
        gpus={g["node"]: GpuSamples.model_validate(g) for g in gpus},
        revision=0,
        activity=idle,
    )


def spec_of(view: dict[str, Any]) -> DeploymentSpec:
    """The spec inside a deployment view (env values are masked there: kept out)."""
    return DeploymentSpec.model_validate({**view, "env": {}})


def of_deployment(view: dict[str, Any]) -> Snapshot:
    """The Snapshot of one `GET /v1/deployments/NAME` answer (its engines included)."""
    return snapshot(deployments=[view], engines=view.get("engines", []))
