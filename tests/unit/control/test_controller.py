"""The controller loop on the memory store, with fake workers that follow the record protocol.

The fake worker is the honest tool here: these tests are about what the controller writes and
when (election, scale, delete, node loss, restarts, Pending reasons), not about processes; the
real worker and engines are exercised in tests/integration/control/.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from deepinfer_nb.config import SchedulerSettings
from deepinfer_nb.control.controller import LEADER_KEY, Controller
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState, GpuInfo, Node, decode
from deepinfer_nb.store import Lease, MetaStore, keys, open_store

S = EngineState
GIB = 1024**3
FAST = SchedulerSettings(
    reconcile_interval_s=0.2, restart_backoff_s=0.1, restart_backoff_max_s=0.5, leader_ttl_s=1
)


class FakeWorker:
    """Claims Scheduled engines of its node, runs them at once, stops Stopping ones."""

    def __init__(self, store: MetaStore, node_id: str, *, gpus: int = 0, ttl: int = 1) -> None:
        self.store, self.id, self.ttl = store, node_id, ttl
        self.node = Node(
            id=node_id,
            gpus=[
                GpuInfo(index=i, memory_total=80 * GIB, memory_free=80 * GIB) for i in range(gpus)
            ],
        )
        self.lease: Lease | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> FakeWorker:
        self.lease = await self.store.grant_lease(self.ttl)
        await self.store.put(keys.node(self.id), self.node.encode(), lease=self.lease.id)
        self.task = asyncio.create_task(self._loop())
        return self

    async def _loop(self) -> None:
        while True:
            for kv in (await self.store.range(keys.ENGINES)).items:
                e = decode(Engine, kv.key, kv.value)
                if e.node != self.id:
                    continue
                if e.state == S.SCHEDULED:
                    nxt = e.transition(S.STARTING, "claimed")
                elif e.state == S.STARTING:
                    nxt = e.transition(S.RUNNING, "ready").model_copy(
                        update={"endpoint": f"{self.id}:1", "started_at": time.time()}
                    )
                elif e.state == S.STOPPING:
                    nxt = e.transition(S.STOPPED, "stopped")
                else:
                    continue
                await self.store.compare_and_swap(kv, nxt.encode())
            await asyncio.sleep(0.02)

    async def fail(self, engine_id: str, *, backoff: float) -> None:
        kv = await self.store.get(keys.engine(engine_id))
        assert kv is not None
        e = decode(Engine, kv.key, kv.value)
        failed = e.transition(S.FAILED, "process exited").model_copy(
            update={"error": "exit code -9", "next_restart_at": time.time() + backoff}
        )
        assert (await self.store.compare_and_swap(kv, failed.encode())).succeeded

    async def kill(self) -> None:
        """The worker dies: no more heartbeats, so its node key vanishes after the TTL."""
        assert self.lease is not None and self.task is not None
        self.lease.stop_keepalive()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.lease is not None and not self.lease.lost:
            await self.lease.revoke()


@pytest.fixture
async def store() -> AsyncIterator[MetaStore]:
    s = open_store("memory://")
    yield s
    await s.close()


@contextlib.asynccontextmanager
async def running(controller: Controller) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(controller.run())
    try:
        yield task
    finally:
        await controller.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def crash(controller: Controller, task: asyncio.Task[None]) -> None:
    """The controller's process dies: it stops heartbeating and never revokes its lease."""
    lease = controller._lease
    assert lease is not None
    lease.stop_keepalive()
    controller._lease = None  # so the cancelled task cannot revoke it on the way out
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def engines(store: MetaStore, deployment: str = "d") -> list[Engine]:
    items = (await store.range(keys.ENGINES)).items
    found = [decode(Engine, kv.key, kv.value) for kv in items]
    return sorted((e for e in found if e.deployment == deployment), key=lambda e: e.replica)


async def until(check: Callable[[], Awaitable[bool]], *, timeout: float = 5.0) -> float:
    """Seconds until `check()` holds; fails the test after `timeout`."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def put_deployment(store: MetaStore, **kw: object) -> DeploymentSpec:
    spec = DeploymentSpec.model_validate({"name": "d", "model": "m", **kw})
    await store.put(keys.deployment(spec.name), spec.encode())
    return spec


def states(es: list[Engine]) -> list[tuple[int, EngineState, str]]:
    return [(e.replica, e.state, e.node) for e in es]


async def test_deploy_scale_and_delete(store: MetaStore) -> None:
    workers = [await FakeWorker(store, n).start() for n in ("a", "b", "c")]
    async with running(Controller(store, settings=FAST)):
        await put_deployment(store, replicas=2, device="cpu")

        async def two_running() -> bool:
            return [(r, s) for r, s, _ in states(await engines(store))] == [
                (0, S.RUNNING),
                (1, S.RUNNING),
            ]

        await until(two_running)
        assert len({e.node for e in await engines(store)}) == 2  # spread over distinct nodes
        first_ids = [e.id for e in await engines(store)]

        await put_deployment(store, replicas=3, device="cpu")

        async def three_running() -> bool:
            es = await engines(store)
            return len(es) == 3 and all(e.state == S.RUNNING for e in es)

        await until(three_running)
        assert {e.node for e in await engines(store)} == {"a", "b", "c"}

        await put_deployment(store, replicas=1, device="cpu")

        async def one_left() -> bool:
            return [e.id for e in await engines(store)] == first_ids[:1]

        await until(one_left)
        (kept,) = await engines(store)
        assert kept.state == S.RUNNING

        await store.delete(keys.deployment("d"))

        async def none_left() -> bool:
            return await engines(store) == []

        await until(none_left)
    for w in workers:
        await w.close()


async def test_scale_down_goes_through_stopping_and_stopped(store: MetaStore) -> None:
    worker = await FakeWorker(store, "a").start()
    seen: list[tuple[int, EngineState]] = []
    async with running(Controller(store, settings=FAST)):
        await put_deployment(store, replicas=2, device="cpu")
        await until(lambda: _all_state(store, S.RUNNING, 2))
        watch = store.watch(keys.ENGINES, start_revision=0)
        await put_deployment(store, replicas=1, device="cpu")

        async def record() -> None:
            async for ev in watch:
                if ev.value:
                    e = decode(Engine, ev.key, ev.value)
                    seen.append((e.replica, e.state))
                else:
                    return  # the record was deleted

        await asyncio.wait_for(record(), 5)
    assert seen == [(1, S.STOPPING), (1, S.STOPPED)]
    await worker.close()


async def _all_state(store: MetaStore, state: EngineState, count: int) -> bool:
    es = await engines(store)
    return len(es) == count and all(e.state == state for e in es)


async def test_unplaceable_deployment_stays_pending_with_reason(store: MetaStore) -> None:
    cpu_only = await FakeWorker(store, "c").start()
    async with running(Controller(store, settings=FAST)):
        await put_deployment(store, device="cuda")

        async def explained() -> bool:
            es = await engines(store)
            return bool(es) and "no GPU on node(s) c" in es[0].reason

        await until(explained)
        (e,) = await engines(store)
        assert e.state == S.PENDING and "--device cpu" in e.reason

        gpu_worker = await FakeWorker(store, "g", gpus=1).start()
        await until(lambda: _all_state(store, S.RUNNING, 1))
        (e,) = await engines(store)
        assert (e.node, e.device, e.gpus, e.gpu_fraction) == ("g", "cuda", [0], 0.9)
    await cpu_only.close()
    await gpu_worker.close()


async def test_lost_node_engines_are_replaced_elsewhere(store: MetaStore) -> None:
    a, b = await FakeWorker(store, "a").start(), await FakeWorker(store, "b").start()
    async with running(Controller(store, settings=FAST)):
        await put_deployment(store, device="cpu")
        await until(lambda: _all_state(store, S.RUNNING, 1))
        (e,) = await engines(store)
        victim, survivor = (a, b) if e.node == "a" else (b, a)
        await victim.kill()

        async def moved() -> bool:
            es = await engines(store)
            return len(es) == 1 and es[0].node == survivor.id and es[0].state == S.RUNNING

        waited = await until(moved, timeout=victim.ttl + 3)
        (moved_engine,) = await engines(store)
        assert moved_engine.id == e.id and moved_engine.restarts == 1
        lost = [t for t in moved_engine.history if t.state == S.LOST]
        assert lost and lost[0].reason == f"node {victim.id} lost its lease"
        assert waited < victim.ttl + 2
    await survivor.close()


async def test_failed_engine_restarts_with_backoff_until_max_restarts(store: MetaStore) -> None:
    worker = await FakeWorker(store, "a").start()
    async with running(Controller(store, settings=FAST)):
        await put_deployment(store, device="cpu", max_restarts=1)
        await until(lambda: _all_state(store, S.RUNNING, 1))
        (e,) = await engines(store)
        failed_at = time.monotonic()
        await worker.fail(e.id, backoff=0.5)

        async def restarted() -> bool:
            es = await engines(store)
            return es[0].restarts == 1 and es[0].state == S.RUNNING

        await until(restarted)
        assert time.monotonic() - failed_at >= 0.5  # the backoff was honoured
        await worker.fail(e.id, backoff=0.0)
        await asyncio.sleep(4 * FAST.reconcile_interval_s)
        (e,) = await engines(store)
        assert (e.state, e.restarts, e.error) == (S.FAILED, 1, "exit code -9")
    await worker.close()


async def test_only_the_leader_acts_and_a_crash_hands_over_within_the_ttl(
    store: MetaStore,
) -> None:
    worker = await FakeWorker(store, "a").start()
    one = Controller(store, settings=FAST, identity="one")
    two = Controller(store, settings=FAST, identity="two")
    async with running(one) as one_task, running(two):
        await one.wait_leading(2)
        await asyncio.sleep(0.3)  # give the standby every chance to misbehave
        assert one.is_leader and not two.is_leader
        kv = await store.get(LEADER_KEY)
        assert kv is not None and kv.value == b"one"
        await put_deployment(store, device="cpu")
        await until(lambda: _all_state(store, S.RUNNING, 1))
        assert two.rounds == 0 and one.rounds > 0

        await crash(one, one_task)
        start = time.monotonic()
        await two.wait_leading(FAST.leader_ttl_s + 1)
        assert time.monotonic() - start <= FAST.leader_ttl_s + 0.2
        await put_deployment(store, device="cpu", replicas=2)
        await until(lambda: _all_state(store, S.RUNNING, 2))
    await worker.close()


async def test_graceful_stop_hands_over_at_once(store: MetaStore) -> None:
    one = Controller(store, settings=FAST, identity="one")
    two = Controller(store, settings=FAST, identity="two")
    async with running(one), running(two):
        await one.wait_leading(2)
        await one.stop()
        start = time.monotonic()
        await two.wait_leading(2)
        assert time.monotonic() - start < 0.5


async def test_a_fenced_out_leader_steps_down_without_writing(store: MetaStore) -> None:
    """Someone else holds the leader key (e.g. our lease expired during a pause): writes fail."""
    worker = await FakeWorker(store, "a").start()
    one = Controller(store, settings=FAST, identity="one")
    async with running(one):
        await one.wait_leading(2)
        await store.delete(LEADER_KEY)
        usurper = await store.grant_lease(5)
        assert await store.create(LEADER_KEY, b"usurper", lease=usurper.id)
        await put_deployment(store, device="cpu")

        async def stepped_down() -> bool:
            return not one.is_leader

        await until(stepped_down)
        await asyncio.sleep(0.3)
        assert await engines(store) == []  # no write got past the fence
        await usurper.revoke()
        await one.wait_leading(2)  # the key is free again: it campaigns and wins
        await until(lambda: _all_state(store, S.RUNNING, 1))
    await worker.close()


def test_an_unknown_configured_strategy_is_rejected(store: MetaStore) -> None:
    from deepinfer_nb.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy 'random'"):
        Controller(store, settings=SchedulerSettings(strategy="random"))


async def test_watch_resyncs_after_compaction_and_keeps_waking_the_loop() -> None:
    store = open_store("memory://?history=2")
    try:
        for i in range(5):
            await store.put(keys.deployment(f"x{i}"), b"{}")
        controller = Controller(store, settings=FAST)
        task = asyncio.create_task(controller._watch(start_revision=1))  # long compacted
        await asyncio.wait_for(controller._wakeup.wait(), 2)  # resync asks for a full round
        controller._wakeup.clear()
        await asyncio.sleep(0.05)
        assert not task.done()
        await store.put(keys.deployment("late"), b"{}")
        await asyncio.wait_for(controller._wakeup.wait(), 2)  # and the new watch delivers
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await store.close()
