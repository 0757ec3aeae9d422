"""Pure rendering of cluster snapshots: pandas frames, HTML and text (no I/O, no widgets).

Used by the reprs of `Cluster`/`Deployment` and by the notebook widgets for their HTML fallback,
so a saved notebook still shows the last state. State colours live here, once.
"""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING, Any, Protocol

from .. import specs
from ..models import (
    DeploymentSpec,
    DownloadProgress,
    Engine,
    EngineSettings,
    EngineState,
    GpuInfo,
    WarmPoolStatus,
)
from .view import IDLE, Snapshot, status_of

if TYPE_CHECKING:
    import pandas as pd


class ClusterInfo(Protocol):
    """What the cluster reprs read (a `Cluster`; render never imports it)."""

    @property
    def connected(self) -> bool: ...
    @property
    def store_url(self) -> str: ...
    @property
    def gateway_url(self) -> str | None: ...
    @property
    def browser_url(self) -> str | None: ...
    def snapshot(self) -> Snapshot: ...


STATE_COLOURS = {
    EngineState.PENDING: "#9e9e9e",
    EngineState.SCHEDULED: "#5c6bc0",
    EngineState.DOWNLOADING: "#0288d1",
    EngineState.STARTING: "#f9a825",
    EngineState.RUNNING: "#2e7d32",
    EngineState.STOPPING: "#8d6e63",
    EngineState.STOPPED: "#616161",
    EngineState.FAILED: "#c62828",
    EngineState.LOST: "#ad1457",
}
ENGINE_COLUMNS = [
    "engine",
    "deployment",
    "state",
    "node",
    "device",
    "gpus",
    "endpoint",
    "restarts",
    "uptime",
    "settings",
    "progress",
    "error",
]
GPU_COLUMNS = [
    "node",
    "gpu",
    "name",
    "util %",
    "mem used GiB",
    "mem total GiB",
    "temp C",
    "power W",
    "processes",
    "booked",
    "note",
]
GIB = 1024**3


def uptime(engine: Engine, now: float | None = None) -> str:
    if engine.state is not EngineState.RUNNING or not engine.started_at:
        return ""
    secs = int((now or time.time()) - engine.started_at)
    h, rest = divmod(max(secs, 0), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def settings_text(s: EngineSettings | None) -> str:
    """ "float32 · eager · context 2048": what the engine runs with."""
    if s is None:
        return ""
    ctx = f"context {s.max_model_len}" if s.max_model_len else "model's full context"
    return f"{s.dtype} · {s.mode} · {ctx}"


def progress_text(
    name: str, stage: str, elapsed: float, stages: list[EngineState], detail: str = ""
) -> str:
    """`deploy --wait`'s line, the same in a notebook and the CLI:
    "smol: Starting (3.2 s) [Pending -> Scheduled -> Starting -> Running] smol-0-ab on vm"."""
    order = " -> ".join(s.value for s in stages)
    return f"{name}: {stage} ({elapsed:.1f} s) [{order}] {detail}".rstrip()


def download_text(d: DownloadProgress | None) -> str:
    """ "downloading 120.3/269.1 MB (45%) at 42.0 MB/s", or waiting for another engine."""
    if d is None:
        return ""
    if d.waiting:
        return f"waiting for another download of {d.repo} on this node"
    if not d.total:
        return f"downloading {d.repo}: listing files"
    return (
        f"downloading {d.done / 1e6:.1f}/{d.total / 1e6:.1f} MB ({d.fraction:.0%}) "
        f"at {d.rate / 1e6:.1f} MB/s"
    )


def engine_row(e: Engine) -> dict[str, Any]:
    devices = e.device + (":" + ",".join(map(str, e.gpus)) if e.gpus else "")
    last = (
        e.error
        or (
            e.reason
            if e.state in (EngineState.PENDING, EngineState.FAILED, EngineState.LOST)
            else ""
        )
    ).strip()
    return {
        "engine": e.id,
        "deployment": e.deployment,
        "state": e.state.value,
        "node": e.node,
        "device": devices if e.node else "",
        "gpus": len(e.gpus),
        "endpoint": e.endpoint,
        "restarts": e.restarts,
        "uptime": uptime(e),
        "settings": settings_text(e.settings),
        "progress": download_text(e.download) if e.state is EngineState.DOWNLOADING else "",
        "error": last.splitlines()[-1][:160] if last else "",
    }


def idle_row(name: str) -> dict[str, Any]:
    """The row of a deployment scaled to zero (it has no engine to show)."""
    return {"engine": "", "deployment": name, "state": IDLE, "restarts": ""}


def engine_rows(snap: Snapshot, deployment: str | None = None) -> list[dict[str, Any]]:
    """One row per engine, and one per deployment scaled to zero without engines left."""
    engines = sorted(snap.engines.values(), key=lambda e: (e.deployment, e.replica, e.id))
    rows = [
        (e.deployment, engine_row(e))
        for e in engines
        if deployment is None or e.deployment == deployment
    ]
    rows += [
        (name, idle_row(name))
        for name in snap.deployments
        if (deployment is None or name == deployment)
        and snap.is_idle(name)
        and not snap.engines_of(name)
    ]
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def engines_frame(snap: Snapshot) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(engine_rows(snap), columns=ENGINE_COLUMNS)


def gpu_rows(snap: Snapshot) -> list[dict[str, Any]]:
    users: dict[tuple[str, int], list[str]] = {}
    for e in snap.engines.values():
        if e.state.active:
            for index in e.gpus:
                users.setdefault((e.node, index), []).append(e.id)
    rows: list[dict[str, Any]] = []
    for node_id in sorted(set(snap.nodes) | set(snap.gpus)):
        node = snap.nodes.get(node_id)
        samples = snap.gpus.get(node_id)
        gpus = samples.gpus if samples and samples.gpus else (node.gpus if node else [])
        pool = pool_text(samples.warm_pool if samples else None)
        if not gpus:
            why = (samples.error if samples else "") or (node.gpu_error if node else "")
            note = f"no NVIDIA GPU on node {node_id}" + (f" ({why})" if why else "")
            rows.append(
                {c: None for c in GPU_COLUMNS}
                | {"node": node_id, "note": note + (f" · {pool}" if pool else "")}
            )
            continue
        for i, g in enumerate(gpus):
            rows.append(
                {
                    "node": node_id,
                    "gpu": g.index,
                    "name": g.name,
                    "util %": g.utilization,
                    "mem used GiB": round(g.memory_used / GIB, 2)
                    if g.memory_used is not None
                    else None,
                    "mem total GiB": round(g.memory_total / GIB, 2),
                    "temp C": g.temperature,
                    "power W": g.power_draw,
                    "processes": gpu_processes(g),
                    "booked": ", ".join(users.get((node_id, g.index), [])),
                    "note": pool if i == 0 else "",
                }
            )
    return rows


def pool_text(pool: WarmPoolStatus | None) -> str:
    """ "warm pool: 1 ready, 1 starting, 1.4 GiB" (the node's warm engine processes); "" without."""
    if pool is None or pool.size <= 0:
        return ""
    parts = [f"{pool.warm} ready"] + ([f"{pool.starting} starting"] if pool.starting else [])
    return f"warm pool: {', '.join(parts)}, {pool.memory_bytes / GIB:.1f} GiB"


def gpu_processes(g: GpuInfo) -> str:
    """What runs on the GPU (NVML's process list joined with the node's engines): each engine
    with the memory it holds, then processes of no engine as "unknown pid N"."""
    held: dict[str, int | None] = {}
    for p in g.processes:
        who = p.engine or f"unknown pid {p.pid}"
        if p.used_memory is None:
            held.setdefault(who, None)
        else:
            held[who] = (held.get(who) or 0) + p.used_memory
    ordered = sorted(held.items(), key=lambda kv: (kv[0].startswith("unknown pid "), kv[0]))
    return ", ".join(
        who if used is None else f"{who} {used / GIB:.2f} GiB" for who, used in ordered
    )


def gpus_frame(snap: Snapshot) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(gpu_rows(snap), columns=GPU_COLUMNS)


# ---- HTML / text


IDLE_COLOUR = "#78909c"


def badge(state: str) -> str:
    colour = STATE_COLOURS.get(EngineState(state), "#616161") if state in _STATES else "#616161"
    if state.startswith("Idle"):
        colour = IDLE_COLOUR
    return (
        f'<span style="background:{colour};color:white;border-radius:4px;'
        f'padding:1px 6px;font-size:90%">{html.escape(state)}</span>'
    )


_STATES = {s.value for s in EngineState}


def html_table(rows: list[dict[str, Any]], columns: list[str], *, empty: str) -> str:
    if not rows:
        return f"<p><i>{html.escape(empty)}</i></p>"
    head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            text = "" if value is None else str(value)
            cells.append(f"<td>{badge(text) if c == 'state' else html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<table class='deepinfer'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def text_table(rows: list[dict[str, Any]], columns: list[str], *, empty: str) -> str:
    if not rows:
        return empty
    cols = [c for c in columns if any(row.get(c) not in (None, "") for row in rows)] or columns
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def engines_html(snap: Snapshot, deployment: str | None = None) -> str:
    return html_table(engine_rows(snap, deployment), ENGINE_COLUMNS, empty="no engines")


def engines_text(snap: Snapshot, deployment: str | None = None) -> str:
    return text_table(engine_rows(snap, deployment), ENGINE_COLUMNS, empty="no engines")


def gpus_html(snap: Snapshot) -> str:
    return html_table(gpu_rows(snap), GPU_COLUMNS, empty="no nodes registered")


def gpus_text(snap: Snapshot) -> str:
    return text_table(gpu_rows(snap), GPU_COLUMNS, empty="no nodes registered")


def rollout_line(snap: Snapshot, name: str) -> str:
    """ "" when the deployment runs its current settings everywhere; else the rollout's state."""
    spec = snap.deployments.get(name)
    if spec is None:
        return ""
    state = specs.status(spec, snap.engines_of(name))
    if state["state"] == "complete":
        return ""
    line = f"rollout {state['state']}: {state['updated']}/{state['replicas']} updated"
    return line + (f" · {state['reason']}" if state["reason"] else "")


def audit_text(spec: DeploymentSpec | None) -> str:
    """ " · created by X" (and ", changed by Y" when someone else changed it last)."""
    if spec is None or not spec.created_by:
        return ""
    changed = spec.updated_by and spec.updated_by != spec.created_by
    return f" · created by {spec.created_by}" + (
        f", changed by {spec.updated_by}" if changed else ""
    )


def deployment_text(snap: Snapshot, name: str) -> str:
    spec = snap.deployments.get(name)
    model = spec.model if spec else "?"
    head = (
        f"Deployment {name!r}: {model} · {status_of(snap, name)}"
        f"{_settings(snap, name)}{audit_text(spec)}"
    )
    if rollout_line(snap, name):
        head += "\n" + rollout_line(snap, name)
    rows = engine_rows(snap, name)
    return head + ("\n" + text_table(rows, ENGINE_COLUMNS, empty="") if rows else "")


def deployment_html(snap: Snapshot, name: str) -> str:
    spec = snap.deployments.get(name)
    model = html.escape(spec.model if spec else "?")
    status = status_of(snap, name)
    return (
        f"<div><b>Deployment</b> <code>{html.escape(name)}</code> · {model} · "
        f"{badge(status.split()[0])} {html.escape(' '.join(status.split()[1:]))}"
        f"{html.escape(_settings(snap, name))}{html.escape(audit_text(spec))}"
        f"{_rollout_html(snap, name)}"
        f"{engines_html(snap, name) if engine_rows(snap, name) else ''}</div>"
    )


def _settings(snap: Snapshot, name: str) -> str:
    spec = snap.deployments.get(name)
    launched = specs.current_settings(spec, snap.engines_of(name)) if spec is not None else None
    return f" · {settings_text(launched)}" if launched is not None else ""


def cluster_text(cluster: ClusterInfo) -> str:
    if not cluster.connected:
        return "Cluster (not connected)"
    snap = cluster.snapshot()
    gw = cluster.gateway_url or "no gateway"
    return (
        f"Cluster {cluster.store_url} · {len(snap.nodes)} node(s) · "
        f"{len(snap.deployments)} deployment(s) · {len(snap.engines)} engine(s) · {gw}"
    )


def cluster_html(cluster: ClusterInfo) -> str:
    if not cluster.connected:
        return "<p>Cluster (not connected)</p>"
    snap = cluster.snapshot()
    gw = cluster.browser_url  # the link is for the user's browser, maybe through a proxy
    link = f"<a href='{html.escape(gw)}' target='_blank'>{html.escape(gw)}</a>" if gw else "none"
    return (
        f"<div><b>Cluster</b> <code>{html.escape(cluster.store_url)}</code> · "
        f"{len(snap.nodes)} node(s) · gateway {link}{engines_html(snap)}</div>"
    )


def _rollout_html(snap: Snapshot, name: str) -> str:
    line = rollout_line(snap, name)
    return f"<div style='color:#8d6e63'>{html.escape(line)}</div>" if line else ""
