"""The controller loop: leader election, then read -> decide -> compare-and-swap, round after round.

Only the elected leader acts. Election is a create-if-absent of `leader/controller` bound to the
candidate's lease; standbys watch that key and campaign again as soon as it is deleted (the leader
resigned, or its lease expired: within one TTL of its death). Every write the leader makes also
compares the leader key's create revision (a fencing token), so a leader that lost its lease
without noticing yet cannot write anything: its transaction fails and it steps down.

Each round reads one consistent snapshot of the whole tree (`range(ROOT)`), asks the pure
`reconcile.decide` what to do and applies each action as a compare-and-swap on the record as read;
a conflict is simply left for the next round. Rounds run when a watched key changes (deployments,
engines, nodes; GPU samples and the leader key do not trigger), when a waiting Failed engine
becomes due, and every `reconcile_interval_s` regardless.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import cast

from ..config import SchedulerSettings
from ..errors import ConfigError, NotLeaderError, StoreError, StoreUnavailableError
from ..models import (
    Activity,
    ControllerMetrics,
    DeploymentSpec,
    Engine,
    EngineState,
    GpuSamples,
    Node,
)
from ..store import (
    Compare,
    Delete,
    EventType,
    KeyValue,
    Lease,
    MetaStore,
    Put,
    TxnResult,
    decode_record,
    keys,
)
from ..store.base import WatchEvent
from ..store.follow import follow
from . import reconcile
from .metrics import ControllerCounters
from .reconcile import (
    Action,
    ActivityAction,
    Backoff,
    CreateEngine,
    DeleteEngine,
    ForgetActivity,
    ScheduleEngine,
    SetIdle,
)
from .scheduler import STRATEGIES, Strategy

log = logging.getLogger(__name__)

LEADER_KEY = keys.leader("controller")
APPLY_CONCURRENCY = 32
"""Writes in flight at once: enough to hide etcd round trips when placing many engines."""
RETRY_S = 1.0


@dataclasses.dataclass
class RoundStats:
    actions: int = 0
    applied: int = 0
    conflicts: int = 0
    wake_at: float | None = None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One consistent read of the tree, decoded (corrupt records skipped with a warning)."""

    revision: int
    deployments: dict[str, DeploymentSpec]
    engines: dict[str, tuple[Engine, KeyValue]]
    nodes: dict[str, Node]
    samples: dict[str, GpuSamples]
    activity: dict[str, tuple[Activity, KeyValue]] = dataclasses.field(default_factory=dict)


async def read_snapshot(store: MetaStore) -> Snapshot:
    result = await store.range(keys.ROOT)
    deployments: dict[str, DeploymentSpec] = {}
    engines: dict[str, tuple[Engine, KeyValue]] = {}
    nodes: dict[str, Node] = {}
    samples: dict[str, GpuSamples] = {}
    activity: dict[str, tuple[Activity, KeyValue]] = {}
    for kv in result.items:
        if name := keys.name_of(kv.key, keys.ACTIVITY):
            if (record := decode_record(Activity, kv.key, kv.value)) is not None:
                activity[name] = (record, kv)
        elif name := keys.name_of(kv.key, keys.DEPLOYMENTS):
            if (spec := decode_record(DeploymentSpec, kv.key, kv.value)) is not None:
                deployments[name] = spec
        elif keys.name_of(kv.key, keys.ENGINES):
            if (engine := decode_record(Engine, kv.key, kv.value)) is not None:
                engines[engine.id] = (engine, kv)
        elif keys.is_node_gpus(kv.key):
            if (sample := decode_record(GpuSamples, kv.key, kv.value)) is not None:
                samples[sample.node] = sample
        elif name := keys.name_of(kv.key, keys.NODES):
            if (node := decode_record(Node, kv.key, kv.value)) is not None:
                nodes[name] = node
    return Snapshot(result.revision, deployments, engines, nodes, samples, activity)


class Controller:
    """Run with `await controller.run()`; `await controller.stop()` resigns and returns."""

    def __init__(
        self,
        store: MetaStore,
        *,
        settings: SchedulerSettings | None = None,
        identity: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings or SchedulerSettings()
        if self.settings.strategy not in STRATEGIES:
            raise ConfigError(
                f"[scheduler] strategy {self.settings.strategy!r}: use {', '.join(STRATEGIES)}"
            )
        self.strategy = cast(Strategy, self.settings.strategy)
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.clock = clock
        self.rounds = 0
        self.counters = ControllerCounters()
        self._lease: Lease | None = None
        self._fence: Compare | None = None
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._leading = asyncio.Event()
        # stop() (a signal handler's task) and run()'s own exit both resign: the second waits for
        # the first's revoke, so run() never returns (and its caller never closes the store)
        # while the leader key is still being deleted.
        self._resigning = asyncio.Lock()

    @property
    def is_leader(self) -> bool:
        return self._fence is not None and self._lease is not None and not self._lease.lost

    def metrics(self) -> ControllerMetrics:
        return self.counters.snapshot(identity=self.identity, leader=self.is_leader)

    async def wait_leading(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._leading.wait(), timeout)

    async def run(self) -> None:
        """Campaign, lead until leadership is lost, repeat; return after `stop()`."""
        try:
            while not self._stopping:
                try:
                    if not await self._campaign():
                        break
                    try:
                        await self._lead()
                    finally:
                        await self._resign()
                except StoreUnavailableError as exc:
                    # The store stayed down past its retry deadline: not ours to fix; campaign
                    # again once it answers (a standby may lead by then).
                    log.warning("store unavailable (%s); retrying in %.0f s", exc, RETRY_S)
                    await asyncio.sleep(RETRY_S)
        finally:
            await self._resign()

    async def stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        self._wakeup.set()
        await self._resign()

    # ---- election ------------------------------------------------------------------------------

    async def _campaign(self) -> bool:
        """Become leader (True), or return False once stopping."""
        ttl = max(1, int(self.settings.leader_ttl_s))
        while not self._stopping:
            lease = await self.store.grant_lease(ttl, keepalive=True)
            if await self.store.create(LEADER_KEY, self.identity.encode(), lease=lease.id):
                kv = await self.store.get(LEADER_KEY)
                if kv is not None and kv.lease == lease.id:
                    self._lease = lease
                    self._fence = Compare(LEADER_KEY, kv.create_revision, target="create")
                    lease.on_lost(self._on_lease_lost)
                    self._leading.set()
                    log.info("controller %s is the leader", self.identity)
                    return not self._stopping
            await lease.revoke()
            await self._wait_for_vacancy(ttl)
        return False

    async def _wait_for_vacancy(self, ttl: int) -> None:
        """Return when the leader key is gone (or after a TTL, to re-check in any case)."""
        current = await self.store.range(LEADER_KEY)
        if not any(kv.key == LEADER_KEY for kv in current.items) or self._stopping:
            return
        watch = self.store.watch(LEADER_KEY, start_revision=current.revision + 1)

        async def deleted() -> None:
            async for event in watch:
                if event.key == LEADER_KEY and event.type == EventType.DELETE:
                    return

        # A compacted watch or a store error ends `deleted` early: the caller re-checks anyway.
        waiters = [asyncio.ensure_future(deleted()), asyncio.ensure_future(self._stopped.wait())]
        try:
            await asyncio.wait(waiters, timeout=ttl, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            await _close(watch)

    def _on_lease_lost(self) -> None:
        log.warning("controller %s lost its leader lease; stepping down", self.identity)
        self._wakeup.set()

    async def _resign(self) -> None:
        async with self._resigning:
            lease, self._lease, self._fence = self._lease, None, None
            self._leading.clear()
            if lease is not None and not lease.lost:
                try:
                    await lease.revoke()  # deletes the leader key: a standby takes over at once
                except StoreError as exc:
                    log.warning("could not revoke the leader lease: %s", exc)

    # ---- leading -------------------------------------------------------------------------------

    async def _lead(self) -> None:
        start = await self.store.range(LEADER_KEY)
        watcher = asyncio.create_task(self._watch(start.revision + 1))
        self._wakeup.set()
        try:
            next_at: float | None = None
            while self.is_leader and not self._stopping:
                timeout = self.settings.reconcile_interval_s
                if next_at is not None:
                    timeout = max(0.0, min(timeout, next_at - self.clock()))
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                self._wakeup.clear()
                if not self.is_leader or self._stopping:
                    break
                try:
                    stats = await self.reconcile_once()
                except NotLeaderError:
                    log.warning("controller %s: fenced write refused; stepping down", self.identity)
                    break
                except StoreError as exc:
                    log.warning("reconcile round failed (retrying next round): %s", exc)
                    continue
                next_at = stats.wake_at
                if stats.conflicts:
                    self._wakeup.set()  # re-read and re-decide at once
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _watch(self, start_revision: int) -> None:
        """Wake the loop on every relevant change from `start_revision`, and after a resync
        (compacted history). Rounds still run on the timer while the store is unreachable."""

        def on_event(event: WatchEvent) -> None:
            if not (event.key.startswith(keys.LEADER) or keys.is_node_gpus(event.key)):
                self._wakeup.set()

        await follow(
            self.store,
            keys.ROOT,
            on_snapshot=lambda _snapshot: self._wakeup.set(),
            on_event=on_event,
            start_revision=start_revision - 1,
            retry_delay_s=RETRY_S,
            name="controller",
        )

    async def reconcile_once(self) -> RoundStats:
        """One round: read, decide, apply. Raises NotLeaderError when fenced out."""
        started = time.perf_counter()
        snap = await read_snapshot(self.store)
        self.rounds += 1
        # decide() is pure and can take a second for thousands of placements: a thread keeps this
        # loop (which also serves the gateway inside a notebook) responsive meanwhile.
        decision = await asyncio.to_thread(
            functools.partial(
                reconcile.decide,
                deployments=snap.deployments,
                engines=[e for e, _ in snap.engines.values()],
                nodes=snap.nodes,
                samples=snap.samples,
                now=self.clock(),
                backoff=Backoff(
                    self.settings.restart_backoff_s, self.settings.restart_backoff_max_s
                ),
                strategy=self.strategy,
                activity={name: record for name, (record, _) in snap.activity.items()},
            )
        )
        stats = RoundStats(actions=len(decision.actions), wake_at=decision.wake_at)
        kvs = {engine_id: kv for engine_id, (_, kv) in snap.engines.items()}
        kvs.update({keys.activity(name): kv for name, (_, kv) in snap.activity.items()})
        gate = asyncio.Semaphore(APPLY_CONCURRENCY)

        async def run(action: Action) -> bool:
            async with gate:
                return await self._apply(action, kvs)

        results = await asyncio.gather(*(run(a) for a in decision.actions))
        stats.applied = sum(results)
        stats.conflicts = stats.actions - stats.applied
        self._count(decision.actions, results, snap)
        self.counters.round_done(time.perf_counter() - started)
        return stats

    def _count(self, actions: Sequence[Action], applied: Sequence[bool], snap: Snapshot) -> None:
        c = self.counters
        c.conflicts += applied.count(False)
        for action, ok in zip(actions, applied, strict=True):
            if not ok:
                continue
            if isinstance(action, (SetIdle, ForgetActivity)):
                c.actions["idle" if isinstance(action, SetIdle) else "forget_activity"] += 1
                continue
            c.actions[reconcile.describe(action)[0]] += 1
            if isinstance(action, ScheduleEngine):
                c.placements += 1
                before = snap.engines.get(action.engine.id)
                if before is not None and before[0].state is EngineState.FAILED:
                    c.restarts += 1

    async def _apply(self, action: Action, kvs: dict[str, KeyValue]) -> bool:
        fence = self._fence
        if fence is None:
            raise NotLeaderError("not the leader")
        if isinstance(action, (SetIdle, ForgetActivity)):
            return await self._apply_activity(action, kvs, fence)
        engine = action.engine
        key = keys.engine(engine.id)
        compare: Sequence[Compare]
        if isinstance(action, CreateEngine):
            compare = [Compare.absent(key), fence]
            ops: list[Put | Delete] = [Put(key, engine.encode())]
        else:
            kv = kvs[engine.id]
            compare = [Compare.unchanged(kv), fence]
            ops = [Delete(key)] if isinstance(action, DeleteEngine) else [Put(key, engine.encode())]
        result = await self.store.txn(compare, ops)
        verb, _ = reconcile.describe(action)
        if not result.succeeded:
            self._check_fence(result, fence)
            log.debug(
                "engine %s: %s conflicted; next round re-decides",
                engine.id,
                verb,
                extra={"engine": engine.id, "node": engine.node},
            )
            return False
        why = action.reason if isinstance(action, DeleteEngine) else engine.reason
        log.info(
            "engine %s: %s (%s) node=%s",
            engine.id,
            verb,
            why,
            engine.node or "-",
            extra={"engine": engine.id, "node": engine.node, "action": verb},
        )
        return True

    async def _apply_activity(
        self, action: ActivityAction, kvs: dict[str, KeyValue], fence: Compare
    ) -> bool:
        """Set a deployment idle, or forget a deleted one's record: compare-and-swap on the
        record as read, so a request recorded meanwhile (a wake) wins."""
        key = keys.activity(action.activity.deployment)
        kv = kvs.get(key)
        compare = [Compare.unchanged(kv) if kv is not None else Compare.absent(key), fence]
        if isinstance(action, SetIdle):
            ops: list[Put | Delete] = [Put(key, action.activity.encode())]
        else:
            ops = [Delete(key)]
        result = await self.store.txn(compare, ops)
        if not result.succeeded:
            self._check_fence(result, fence)
            return False
        if isinstance(action, SetIdle):
            log.info("deployment %s: %s", action.activity.deployment, action.reason)
        return True

    @staticmethod
    def _check_fence(result: TxnResult, fence: Compare) -> None:
        leader = result.current.get(LEADER_KEY)
        if leader is None or leader.create_revision != fence.revision:
            raise NotLeaderError("the leader key changed")


async def _close(watch: AsyncIterator[object]) -> None:
    aclose = getattr(watch, "aclose", None)
    if aclose is not None:
        await aclose()
