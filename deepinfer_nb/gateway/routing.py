"""The routing table: which engines serve which model, kept in memory from store watches.

`RoutingTable` follows `deployments/`, `engines/` and `activity/` (a snapshot, then a watch from
the snapshot's revision; a compacted history means re-read and resume), so serving a request
never touches the store. It owns one pooled `EngineClient` (one gRPC channel) per Running engine,
carrying that engine's auth token. The choice of replica is the pure `choose` (least outstanding
requests, ties taken in turn); why a deployment cannot serve is the pure `unavailable_reason`,
and whether a replica is on its way (so a request may wait for it: gateway/hold.py) the pure
`coming`. `changed(name)` is a future that a change to the deployment, its engines or its
activity record resolves: waiters are woken by the store watch, never by polling.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any, Generic, Protocol, TypeVar

from ..engine.client import EngineClient
from ..models import Activity, DeploymentSpec, Engine, EngineState
from ..store import decode_record, decode_records, keys
from ..store.base import EventType, KeyValue, MetaStore, RangeResult, WatchEvent
from ..store.follow import follow
from .errors import model_not_found, no_replica

log = logging.getLogger(__name__)

ClientFactory = Callable[..., Any]
R = TypeVar("R", DeploymentSpec, Engine, Activity)
# states whose reason/error explains a deployment that cannot serve
_EXPLAINING = (EngineState.PENDING, EngineState.FAILED, EngineState.LOST)
# states on the way to Running (a Lost engine is placed again)
_ON_THE_WAY = frozenset(
    {
        EngineState.PENDING,
        EngineState.SCHEDULED,
        EngineState.DOWNLOADING,
        EngineState.STARTING,
        EngineState.LOST,
    }
)


class TableObserver(Protocol):
    """Receives changes worth exporting as metrics."""

    def inflight_changed(self, engine_id: str, deployment: str, value: int) -> None: ...

    def states_changed(self, counts: dict[str, int]) -> None: ...


@dataclasses.dataclass(eq=False)
class Replica:
    engine: Engine
    inflight: int = 0
    retired: bool = False
    _client: Any = None
    _stale: list[Any] = dataclasses.field(default_factory=list)

    @property
    def id(self) -> str:
        return self.engine.id

    @property
    def routable(self) -> bool:
        return (
            self.engine.state is EngineState.RUNNING
            and bool(self.engine.endpoint)
            and not self.retired
        )


def choose(
    replicas: Sequence[Replica], *, exclude: Collection[str] = (), turn: int = 0
) -> Replica | None:
    """The routable replica with the fewest outstanding requests; ties are taken in turn so
    sequential traffic still spreads over idle replicas."""
    candidates = [r for r in replicas if r.routable and r.id not in exclude]
    if not candidates:
        return None
    least = min(r.inflight for r in candidates)
    tied = sorted((r for r in candidates if r.inflight == least), key=lambda r: r.id)
    return tied[turn % len(tied)]


def unavailable_reason(spec: DeploymentSpec, engines: Sequence[Engine]) -> str:
    """Why `spec` has no Running replica, in words a client can act on."""
    name = spec.name
    if spec.replicas == 0:
        return f"deployment {name} is scaled to 0 replicas"
    if not engines:
        return f"deployment {name} is Pending (no engine created yet)"
    detail = next(
        (e.error or e.reason for e in engines if e.state in _EXPLAINING and (e.error or e.reason)),
        "",
    )
    suffix = f": {detail}" if detail else ""
    states = collections.Counter(e.state.value for e in engines)
    if len(states) == 1:
        return f"deployment {name} is {engines[0].state.value}{suffix}"
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    return f"deployment {name} has no running replica ({counts}){suffix}"


def coming(
    spec: DeploymentSpec,
    engines: Sequence[Engine],
    *,
    idle: bool = False,
    tried: Collection[str] = (),
) -> bool:
    """Whether a replica of `spec` will (again) be Running without anyone acting: it is idle
    (scaled to zero: the next request wakes it), an engine is on its way (waiting for its first
    placement, placed, downloading, starting, or Failed with restarts left; not one Pending because
    no node fits), or a replica a request just found unreachable
    (`tried`) is still listed Running (its worker is about to mark it Failed). A deployment
    scaled to 0 replicas, or whose engines all failed for good, is not coming."""
    if idle:
        return True
    if spec.replicas == 0:
        return False
    wanted = [e for e in engines if e.replica < spec.replicas]
    if len({e.replica for e in wanted}) < spec.replicas:
        return True  # the controller creates the missing slots
    for e in wanted:
        if e.state is EngineState.PENDING and e.unplaced:
            continue  # no node fits: nothing starts until capacity or the spec changes
        if e.state in _ON_THE_WAY:
            return True
        if e.state is EngineState.FAILED and not e.permanent and e.restarts < spec.max_restarts:
            return True
        if e.state in (EngineState.STOPPING, EngineState.STOPPED):
            return True  # a wanted slot: the controller starts a new engine in it
        if e.state is EngineState.RUNNING and e.id in tried:
            return True
    return False


@dataclasses.dataclass(eq=False)
class _Followed(Generic[R]):
    """One prefix the table follows: its records (by key name) and how a change applies."""

    prefix: str
    cls: type[R]
    records: dict[str, R]
    put: Callable[[str, R], str]
    delete: Callable[[str], str]
    changed: Callable[[], None]
    """After a snapshot or an event: keep what is derived from the records current."""
    synced: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class Lease:
    """One request's hold on a replica: counts as outstanding until released."""

    __slots__ = ("_released", "_table", "client", "replica")

    def __init__(self, table: RoutingTable, replica: Replica) -> None:
        self._table = table
        self.replica = replica
        self.client: EngineClient = table.client_for(replica)
        self._released = False

    @property
    def engine_id(self) -> str:
        return self.replica.id

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._table.release(self.replica)


class RoutingTable:
    """In-memory view of deployments and engines, following the store."""

    def __init__(
        self,
        store: MetaStore,
        *,
        client_factory: ClientFactory = EngineClient,
        observer: TableObserver | None = None,
        retry_delay_s: float = 1.0,
    ) -> None:
        self._store = store
        self._client_factory = client_factory
        self._observer = observer
        self._retry_delay_s = retry_delay_s
        self.deployments: dict[str, DeploymentSpec] = {}
        self.engines: dict[str, Engine] = {}
        self._replicas: dict[str, dict[str, Replica]] = {}  # deployment -> engine id -> replica
        self._by_model: dict[str, str] = {}
        self._turn = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.activity: dict[str, Activity] = {}
        self._followed: tuple[_Followed[Any], ...] = (
            _Followed(
                keys.DEPLOYMENTS,
                DeploymentSpec,
                self.deployments,
                put=self._put_deployment,
                delete=self._delete_deployment,
                changed=self._reindex_models,
            ),
            _Followed(
                keys.ENGINES,
                Engine,
                self.engines,
                put=self._put_engine,
                delete=self._delete_engine,
                changed=self._report_states,
            ),
            _Followed(
                keys.ACTIVITY,
                Activity,
                self.activity,
                put=self._put_activity,
                delete=self._delete_activity,
                changed=lambda: None,
            ),
        )
        self._closing: set[asyncio.Task[None]] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self, *, timeout: float = 10.0) -> None:
        """Start following the store; returns once every prefix was read once."""
        self._tasks = [asyncio.create_task(self._follow(f)) for f in self._followed]
        waits = [asyncio.create_task(f.synced.wait()) for f in self._followed]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except asyncio.TimeoutError:
            log.warning(
                "routing table: store not read within %.0f s; following in background", timeout
            )

    @property
    def synced(self) -> bool:
        return all(f.synced.is_set() for f in self._followed)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for futures in self._waiters.values():
            for future in futures:
                future.cancel()
        self._waiters.clear()
        clients = []
        for reps in self._replicas.values():
            for r in reps.values():
                clients.extend([*r._stale, *([r._client] if r._client is not None else [])])
                r._client = None
                r._stale.clear()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _follow(self, followed: _Followed[Any]) -> None:
        def on_snapshot(result: RangeResult) -> None:
            self._load(followed, result.items)
            followed.synced.set()

        await follow(
            self._store,
            followed.prefix,
            on_snapshot=on_snapshot,
            on_event=lambda event: self._apply(followed, event),
            retry_delay_s=self._retry_delay_s,
            name="routing table",
        )

    # ---- applying store state ------------------------------------------------------------------

    def _load(self, followed: _Followed[Any], items: list[KeyValue]) -> None:
        """A prefix read whole (at start, or again after a compacted watch history)."""
        fresh = decode_records(followed.cls, items, followed.prefix)
        for gone in set(followed.records) - set(fresh):
            followed.delete(gone)
        for name, record in fresh.items():
            followed.put(name, record)
        followed.changed()
        self._notify_all()

    def _apply(self, followed: _Followed[Any], event: WatchEvent) -> None:
        """One watch event: the record put or deleted, then the deployment's waiters woken."""
        name = keys.name_of(event.key, followed.prefix)
        if not name:
            return
        if event.type is EventType.DELETE:
            deployment = followed.delete(name)
        else:
            record = decode_record(followed.cls, event.key, event.value)
            if record is None:
                return
            deployment = followed.put(name, record)
        followed.changed()
        self._notify(deployment)

    # each put/delete returns the deployment whose waiters the change wakes

    def _put_deployment(self, name: str, spec: DeploymentSpec) -> str:
        self.deployments[name] = spec
        return name

    def _delete_deployment(self, name: str) -> str:
        self.deployments.pop(name, None)
        return name

    def _put_activity(self, name: str, record: Activity) -> str:
        self.activity[name] = record
        return name

    def _delete_activity(self, name: str) -> str:
        self.activity.pop(name, None)
        return name

    def _delete_engine(self, engine_id: str) -> str:
        engine = self.engines.get(engine_id)
        self._remove_engine(engine_id)
        return engine.deployment if engine is not None else ""

    def _put_engine(self, engine_id: str, engine: Engine) -> str:
        previous = self.engines.get(engine.id)
        if previous is not None and previous.deployment != engine.deployment:
            self._remove_engine(engine.id)
            previous = None
        self.engines[engine.id] = engine
        reps = self._replicas.setdefault(engine.deployment, {})
        replica = reps.get(engine.id)
        if replica is None:
            reps[engine.id] = Replica(engine)
            return engine.deployment
        moved = (replica.engine.endpoint, replica.engine.auth_token) != (
            engine.endpoint,
            engine.auth_token,
        )
        if moved or engine.state is not EngineState.RUNNING:
            self._retire_client(replica)
        replica.engine = engine
        return engine.deployment

    def _remove_engine(self, engine_id: str) -> None:
        engine = self.engines.pop(engine_id, None)
        if engine is None:
            return
        replica = self._replicas.get(engine.deployment, {}).pop(engine_id, None)
        if replica is not None:
            replica.retired = True
            self._retire_client(replica)

    def _retire_client(self, replica: Replica) -> None:
        # in-flight requests keep their channel (a Stopping engine drains them) and it is closed
        # when the last of them is released; new requests get a channel to the current endpoint
        if replica._client is not None:
            replica._stale.append(replica._client)
            replica._client = None
        if replica.inflight == 0:
            for client in replica._stale:
                self._close_later(client)
            replica._stale.clear()

    def _close_later(self, client: Any) -> None:
        task = asyncio.get_running_loop().create_task(client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def changed(self, deployment: str) -> asyncio.Future[None]:
        """A future resolved at the next change of `deployment`, its engines or its activity."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._waiters.setdefault(deployment, [])
        waiting[:] = [f for f in waiting if not f.done()]  # waits that timed out or left
        waiting.append(future)
        return future

    def _notify(self, deployment: str) -> None:
        for future in self._waiters.pop(deployment, []):
            if not future.done():
                future.set_result(None)

    def _notify_all(self) -> None:
        for name in list(self._waiters):
            self._notify(name)

    def _reindex_models(self) -> None:
        self._by_model = {spec.model_name: name for name, spec in self.deployments.items()}

    def _report_states(self) -> None:
        if self._observer is not None:
            counts = collections.Counter(e.state.value for e in self.engines.values())
            self._observer.states_changed({s.value: counts.get(s.value, 0) for s in EngineState})

    # ---- queries used per request ---------------------------------------------------------------

    def resolve(self, model: str) -> DeploymentSpec:
        """The deployment serving `model` (its served name, or the deployment's name)."""
        name = self._by_model.get(model, model)
        spec = self.deployments.get(name)
        if spec is None:
            raise model_not_found(model)
        return spec

    def engines_of(self, deployment: str) -> list[Engine]:
        reps = self._replicas.get(deployment, {})
        return sorted((r.engine for r in reps.values()), key=lambda e: (e.replica, e.id))

    def is_idle(self, deployment: str) -> bool:
        """Scaled to zero (the next request wakes it)."""
        record = self.activity.get(deployment)
        spec = self.deployments.get(deployment)
        return record is not None and spec is not None and record.idles(spec)

    def coming(self, spec: DeploymentSpec, *, tried: Collection[str] = ()) -> bool:
        """Whether a request for `spec` that found no replica may wait for one (`coming`)."""
        engines = self.engines_of(spec.name)
        return coming(spec, engines, idle=self.is_idle(spec.name), tried=tried)

    def incarnation(self, engine_id: str) -> tuple[str, str, int] | None:
        """What identifies one run of an engine (a restart gives a new endpoint or pid)."""
        engine = self.engines.get(engine_id)
        return None if engine is None else (engine.state.value, engine.endpoint, engine.pid)

    def serving(self) -> list[DeploymentSpec]:
        """Deployments with at least one routable replica, or scaled to zero (a request wakes
        them)."""
        return [
            spec
            for name, spec in sorted(self.deployments.items())
            if self.is_idle(name) or any(r.routable for r in self._replicas.get(name, {}).values())
        ]

    def inflight(self, deployment: str) -> int:
        """Requests of `deployment` an engine is answering now."""
        return sum(r.inflight for r in self._replicas.get(deployment, {}).values())

    def acquire(self, spec: DeploymentSpec, *, exclude: Collection[str] = ()) -> Lease:
        """Hold the least-loaded Running replica of `spec`; 503 with the reason if none."""
        reps = list(self._replicas.get(spec.name, {}).values())
        replica = choose(reps, exclude=exclude, turn=self._turn)
        self._turn += 1
        if replica is None:
            if exclude and any(r.routable for r in reps):
                raise no_replica(f"deployment {spec.name} has no other running replica")
            if self.is_idle(spec.name):
                raise no_replica(
                    f"deployment {spec.name} is idle (scaled to zero); a request wakes it: "
                    "retry in a few seconds"
                )
            raise no_replica(unavailable_reason(spec, [r.engine for r in reps]))
        replica.inflight += 1
        self._notify_inflight(replica)
        return Lease(self, replica)

    def release(self, replica: Replica) -> None:
        replica.inflight -= 1
        self._notify_inflight(replica)
        if replica.inflight == 0 and replica._stale:
            for client in replica._stale:
                self._close_later(client)
            replica._stale.clear()

    def running_clients(self) -> list[tuple[Engine, EngineClient]]:
        """Each routable replica's engine and pooled client (what the metrics poll asks)."""
        return [
            (r.engine, self.client_for(r))
            for reps in self._replicas.values()
            for r in reps.values()
            if r.routable
        ]

    def client_for(self, replica: Replica) -> EngineClient:
        if replica._client is None:
            replica._client = self._client_factory(
                replica.engine.endpoint, token=replica.engine.auth_token
            )
        client: EngineClient = replica._client
        return client

    def _notify_inflight(self, replica: Replica) -> None:
        if self._observer is not None:
            self._observer.inflight_changed(replica.id, replica.engine.deployment, replica.inflight)
