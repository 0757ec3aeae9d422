"""Live widgets (ipywidgets 8): the engine monitor and the GPU monitor.

Both redraw from the cluster view's watch (a listener on the runtime loop) and, for the engine
monitor, from a metrics poll (`EngineClient.metrics()` about once a second) that runs as a task on
the runtime loop, so the kernel never blocks. Setting widget values from that thread is what
ipywidgets supports. Each widget's mimebundle also carries `text/html` and `text/plain` snapshots,
so a saved notebook (or a front end without the widget manager) still shows the last state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import html
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ..client import render
from ..models import EngineState

if TYPE_CHECKING:
    from ..client.cluster import Cluster
    from ..client.view import Snapshot

SPARK = "▁▂▃▄▅▆▇█"
METRIC_COLUMNS = ["in-flight", "tok/s", "TTFT ms", "KV %"]


def sparkline(values: list[float | None], *, top: float = 100.0) -> str:
    chars = []
    for v in values:
        if v is None:
            chars.append(" ")
        else:
            chars.append(SPARK[min(len(SPARK) - 1, max(0, int(v / top * (len(SPARK) - 1))))])
    return "".join(chars)


class _Snapshotting(widgets.VBox):
    """A VBox whose mimebundle adds HTML/text snapshots for front ends without widgets."""

    def snapshot_html(self) -> str:
        raise NotImplementedError

    def snapshot_text(self) -> str:
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(super()._repr_mimebundle_(**kwargs) or {})
        bundle["text/html"] = self.snapshot_html()
        bundle["text/plain"] = self.snapshot_text()
        return bundle


class EngineMonitor(_Snapshotting):
    """Engines with state colour, node, devices, uptime, restarts, last error and live metrics."""

    def __init__(self, cluster: Cluster, *, poll_s: float = 1.0) -> None:
        self._cluster = cluster
        self._poll_s = poll_s
        self.metrics: dict[str, dict[str, Any]] = {}
        self._header = widgets.HTML()
        self._table = widgets.HTML()
        self._choice = widgets.Dropdown(description="deployment", options=[])
        self._stop = widgets.Button(description="Stop", button_style="danger", icon="stop")
        self._restart = widgets.Button(description="Restart", icon="refresh")
        self._status = widgets.HTML()
        self._stop.on_click(self._on_stop)
        self._restart.on_click(self._on_restart)
        super().__init__(
            [
                self._header,
                self._table,
                widgets.HBox([self._choice, self._stop, self._restart]),
                self._status,
            ]
        )
        self._task: Any = None
        self.refresh()
        cluster.view.add_listener(self._on_change)
        self._task = cluster.runtime.submit(self._poll())

    # ---- data ----

    def rows(self, snap: Snapshot) -> list[dict[str, Any]]:
        rows = render.engine_rows(snap)
        for row in rows:
            m = self.metrics.get(row["engine"], {})
            row.update({c: m.get(c, "") for c in METRIC_COLUMNS})
        return rows

    def snapshot_html(self) -> str:
        snap = self._cluster.snapshot()
        return render.html_table(
            self.rows(snap), render.ENGINE_COLUMNS + METRIC_COLUMNS, empty="no engines yet"
        )

    def snapshot_text(self) -> str:
        snap = self._cluster.snapshot()
        return "Engine monitor\n" + render.text_table(
            self.rows(snap), render.ENGINE_COLUMNS + METRIC_COLUMNS, empty="no engines yet"
        )

    def refresh(self) -> None:
        snap = self._cluster.snapshot()
        running = sum(e.state is EngineState.RUNNING for e in snap.engines.values())
        self._header.value = (
            f"<b>deepinfer</b> · {html.escape(self._cluster.store_url)} · "
            f"{len(snap.nodes)} node(s) · {len(snap.engines)} engine(s), "
            f"{running} running"
        )
        self._table.value = self.snapshot_html()
        names = sorted(snap.deployments)
        if list(self._choice.options) != names:
            self._choice.options = names

    def _on_change(self) -> None:
        self.refresh()

    async def _poll(self) -> None:
        cluster = self._cluster
        while cluster.connected:
            snap = self._cluster.snapshot()
            live = [
                e for e in snap.engines.values() if e.state is EngineState.RUNNING and e.endpoint
            ]
            for e in live:
                try:
                    m = await asyncio.wait_for(cluster.engine_metrics(e), 2.0)
                except Exception:  # a busy or stopping engine: keep the last numbers
                    continue
                ttft = cluster.last_ttft(e.id)
                self.metrics[e.id] = {
                    "in-flight": m.inflight_rpcs or m.running_requests + m.waiting_requests,
                    "tok/s": round(m.generation_tokens_per_s, 1),
                    "TTFT ms": round(ttft * 1000) if ttft else "",
                    "KV %": round(m.kv_cache_usage * 100, 1),
                }
            for gone in set(self.metrics) - {e.id for e in live}:
                self.metrics.pop(gone, None)
            self.refresh()
            await asyncio.sleep(self._poll_s)

    # ---- buttons (kernel thread; the work runs on the runtime loop) ----

    def _on_stop(self, _button: Any) -> None:
        name = self._choice.value
        if name:
            self._status.value = f"stopping {html.escape(name)}…"
            self._cluster.runtime.submit(self._cluster.delete_async(name, wait_s=0))

    def _on_restart(self, _button: Any) -> None:
        name = self._choice.value
        if name:
            self._status.value = f"restarting {html.escape(name)}…"
            self._cluster.runtime.submit(self._restart_dep(name))

    async def _restart_dep(self, name: str) -> None:
        spec = self._cluster.snapshot().deployments.get(name)
        if spec is None:
            return
        await self._cluster.set_replicas_async(name, 0)
        await self._cluster.view.wait_for(lambda s: not s.engines_of(name))
        await self._cluster.set_replicas_async(name, spec.replicas)
        self._status.value = f"{html.escape(name)} restarted"

    def close(self) -> None:
        self._cluster.view.remove_listener(self._on_change)
        if self._task is not None:
            self._task.cancel()
        super().close()


class GpuMonitor(_Snapshotting):
    """Per node and GPU: utilisation, memory, temperature, power, a history sparkline, users."""

    def __init__(self, cluster: Cluster, *, history: int = 30) -> None:
        self._cluster = cluster
        self.history: dict[tuple[str, int], collections.deque[float | None]] = {}
        self._history_len = history
        self._last_at: dict[str, float] = {}
        self._table = widgets.HTML()
        super().__init__([widgets.HTML("<b>GPUs</b>"), self._table])
        self.refresh()
        cluster.view.add_listener(self.refresh)

    def rows(self, snap: Snapshot) -> list[dict[str, Any]]:
        for node, samples in snap.gpus.items():
            if self._last_at.get(node) == samples.at:
                continue
            self._last_at[node] = samples.at
            for g in samples.gpus:
                hist = self.history.setdefault(
                    (node, g.index), collections.deque(maxlen=self._history_len)
                )
                hist.append(g.utilization)
        rows = render.gpu_rows(snap)
        for row in rows:
            past = self.history.get((row["node"], row["gpu"])) if row["gpu"] is not None else None
            row["history"] = sparkline(list(past)) if past else ""
        return rows

    def snapshot_html(self) -> str:
        return render.html_table(
            self.rows(self._cluster.snapshot()),
            [*render.GPU_COLUMNS, "history"],
            empty="no nodes registered",
        )

    def snapshot_text(self) -> str:
        return "GPU monitor\n" + render.text_table(
            self.rows(self._cluster.snapshot()),
            [*render.GPU_COLUMNS, "history"],
            empty="no nodes registered",
        )

    def refresh(self) -> None:
        self._table.value = self.snapshot_html()

    def close(self) -> None:
        self._cluster.view.remove_listener(self.refresh)
        super().close()


def close_quietly(widget: Any) -> None:
    with contextlib.suppress(Exception):
        widget.close()
