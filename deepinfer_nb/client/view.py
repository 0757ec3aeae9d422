"""A watch-fed, in-memory mirror of the cluster's records for the notebook.

`ClusterView` reads `/deepinfer/v1/` once, then follows one store watch on the runtime loop. Reprs,
tables and widgets read its snapshots (a lock-protected copy, no store I/O), which is what lets
`__repr__` and `_repr_html_` stay free of I/O. Listeners are called on the runtime loop after each
applied batch; `wait_for` lets coroutines wait for a condition on the mirrored state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from ..config import AgentSettings
from ..control.downloads import Downloads
from ..errors import RecordError
from ..hub.preflight import is_hub_id
from ..models import Activity, DeploymentSpec, Engine, EngineState, GpuSamples, Node, decode
from ..store import keys
from ..store.base import EventType, MetaStore, RangeResult, WatchEvent
from ..store.follow import follow

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One consistent view of the mirrored records."""

    deployments: dict[str, DeploymentSpec]
    engines: dict[str, Engine]
    nodes: dict[str, Node]
    gpus: dict[str, GpuSamples]
    revision: int
    activity: dict[str, Activity] = dataclasses.field(default_factory=dict)

    def engines_of(self, deployment: str) -> list[Engine]:
        found = [e for e in self.engines.values() if e.deployment == deployment]
        return sorted(found, key=lambda e: (e.replica, e.id))

    def is_idle(self, deployment: str) -> bool:
        """Scaled to zero after its idle_timeout (the next request starts an engine)."""
        record, spec = self.activity.get(deployment), self.deployments.get(deployment)
        return record is not None and spec is not None and record.idles(spec)


class ClusterView:
    """Mirror of deployments, engines, nodes, GPU samples and activity, kept current by a
    watch."""

    def __init__(self, store: MetaStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._deployments: dict[str, DeploymentSpec] = {}
        self._engines: dict[str, Engine] = {}
        self._nodes: dict[str, Node] = {}
        self._gpus: dict[str, GpuSamples] = {}
        self._activity: dict[str, Activity] = {}
        self._revision = 0
        self._listeners: list[Callable[[], None]] = []
        self._changed: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle (runtime loop) ----

    async def start(self) -> None:
        self._changed = asyncio.Condition()
        await self._load(await self._store.range(keys.ROOT))
        self._task = asyncio.create_task(
            follow(
                self._store,
                keys.ROOT,
                on_snapshot=self._load,
                on_event=self._on_event,
                start_revision=self._revision,
                name="cluster view",
            ),
            name="deepinfer-view",
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _load(self, result: RangeResult) -> None:
        with self._lock:
            self._deployments.clear()
            self._engines.clear()
            self._nodes.clear()
            self._gpus.clear()
            self._activity.clear()
            for kv in result.items:
                self._apply_put(kv.key, kv.value)
            self._revision = result.revision
        await self._notify()

    async def _on_event(self, event: WatchEvent) -> None:
        with self._lock:
            if event.type is EventType.PUT:
                self._apply_put(event.key, event.value)
            else:
                self._apply_delete(event.key)
            self._revision = event.revision
        await self._notify()

    def _apply_put(self, key: str, value: bytes) -> None:
        try:
            if keys.is_node_gpus(key):
                samples = decode(GpuSamples, key, value)
                self._gpus[samples.node] = samples
            elif name := keys.name_of(key, keys.DEPLOYMENTS):
                self._deployments[name] = decode(DeploymentSpec, key, value)
            elif name := keys.name_of(key, keys.ENGINES):
                self._engines[name] = decode(Engine, key, value)
            elif name := keys.name_of(key, keys.NODES):
                self._nodes[name] = decode(Node, key, value)
            elif name := keys.name_of(key, keys.ACTIVITY):
                self._activity[name] = decode(Activity, key, value)
        except RecordError as exc:
            log.warning("%s", exc)

    def _apply_delete(self, key: str) -> None:
        if keys.is_node_gpus(key):
            self._gpus.pop(key[len(keys.NODES) : -len(keys.GPU_SUFFIX)], None)
        elif name := keys.name_of(key, keys.DEPLOYMENTS):
            self._deployments.pop(name, None)
        elif name := keys.name_of(key, keys.ENGINES):
            self._engines.pop(name, None)
        elif name := keys.name_of(key, keys.NODES):
            self._nodes.pop(name, None)
        elif name := keys.name_of(key, keys.ACTIVITY):
            self._activity.pop(name, None)

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()
        for listener in list(self._listeners):
            try:
                listener()
            except Exception as exc:  # a broken widget must not stop the watch
                log.warning("cluster view listener failed: %s", exc)

    # ---- reading (any thread) ----

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                deployments=dict(self._deployments),
                engines=dict(self._engines),
                nodes=dict(self._nodes),
                gpus=dict(self._gpus),
                revision=self._revision,
                activity=dict(self._activity),
            )

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def wait_for(self, predicate: Callable[[Snapshot], bool], *, poll_s: float = 1.0) -> None:
        """Return once `predicate(snapshot)` holds (re-checked on every change, and every poll_s
        so time-based conditions are seen too). The caller bounds it with a timeout."""
        assert self._changed is not None, "view not started"
        while not predicate(self.snapshot()):
            async with self._changed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), poll_s)


# ---- deployment progress (pure; for reprs, waits and widgets)

STAGES = [
    EngineState.PENDING,
    EngineState.SCHEDULED,
    EngineState.DOWNLOADING,
    EngineState.STARTING,
    EngineState.RUNNING,
]


def stages(engines: Iterable[Engine], *, may_download: bool) -> list[EngineState]:
    """The stages a deployment's progress lists: Downloading only for one that can download
    (`may_download`) or whose engine did (now, or in its history: the stage a wait that began
    late still passed), never for a local model."""
    downloads = may_download or any(
        e.state is EngineState.DOWNLOADING
        or any(t.state is EngineState.DOWNLOADING for t in e.history)
        for e in engines
    )
    return [s for s in STAGES if downloads or s is not EngineState.DOWNLOADING]


def may_download(model: str, revision: str, agent: AgentSettings) -> bool:
    """Whether a worker may download `model` before starting it: a hub id whose files are not
    all in this host's hub cache (`[agent] hub_cache`). A worker on another host may have it
    cached and skip the stage; the list then still names it, as a step that may come."""
    if not is_hub_id(model):
        return False
    cache = Path(agent.hub_cache).expanduser() if agent.hub_cache else None
    return Downloads(node_id="", cache_dir=cache).cached(model, revision) is None


def stage_of(engines: list[Engine], replicas: int) -> str:
    """The least advanced stage among a deployment's engines, for progress display."""
    if replicas == 0:
        return "Stopped"
    if len(engines) < replicas:
        return EngineState.PENDING.value
    for stage in STAGES:
        if any(e.state is stage for e in engines):
            return stage.value
    return engines[0].state.value if engines else EngineState.PENDING.value


IDLE = "Idle (scaled to zero)"


def status_of(snap: Snapshot, name: str) -> str:
    spec = snap.deployments.get(name)
    engines = snap.engines_of(name)
    if spec is None:
        return "Removed" if not engines else f"Removing ({len(engines)} engines stopping)"
    if snap.is_idle(name):
        return IDLE
    running = sum(e.state is EngineState.RUNNING for e in engines)
    failed = [e for e in engines if e.state is EngineState.FAILED]
    stage = stage_of([e for e in engines if e.replica < spec.replicas], spec.replicas)
    text = f"{stage} {running}/{spec.replicas}"
    if failed:
        text = f"Failed {running}/{spec.replicas}: {failed[0].error or failed[0].reason}"
    return text
