"""The routing table: the pure replica choice and reasons, and following the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deepinfer_nb.errors import RevisionCompactedError
from deepinfer_nb.gateway.errors import APIError
from deepinfer_nb.gateway.routing import (
    Replica,
    RoutingTable,
    choose,
    coming,
    unavailable_reason,
)
from deepinfer_nb.models import Activity, DeploymentSpec, Engine, EngineState
from deepinfer_nb.store import keys
from deepinfer_nb.store.memory import MemoryStore

from .fakes import FakeFleet, put_deployment, put_engine


def _replica(i: int, inflight: int = 0, state: EngineState = EngineState.RUNNING) -> Replica:
    engine = Engine(id=f"d-{i}", deployment="d", replica=i, state=state, endpoint=f"h:{i}")
    return Replica(engine, inflight=inflight)


def test_choose_takes_the_least_outstanding() -> None:
    reps = [_replica(0, 3), _replica(1, 1), _replica(2, 2)]
    assert choose(reps).id == "d-1"  # type: ignore[union-attr]


def test_choose_rotates_among_ties_and_skips_excluded_and_not_running() -> None:
    reps = [_replica(0), _replica(1), _replica(2, state=EngineState.STARTING)]
    picked = [choose(reps, turn=t).id for t in range(4)]  # type: ignore[union-attr]
    assert picked == ["d-0", "d-1", "d-0", "d-1"]
    assert choose(reps, exclude={"d-0"}).id == "d-1"  # type: ignore[union-attr]
    assert choose(reps, exclude={"d-0", "d-1"}) is None


def test_unavailable_reason_names_the_state_and_why() -> None:
    spec = DeploymentSpec(name="qwen", model="Qwen/Qwen2.5-7B-Instruct")
    starting = Engine(id="q-0", deployment="qwen", state=EngineState.STARTING, reason="claimed")
    assert unavailable_reason(spec, [starting]) == "deployment qwen is Starting"
    pending = Engine(id="q-0", deployment="qwen", reason="GPU 1 has 3.1 GiB free, needs 21 GiB")
    assert unavailable_reason(spec, [pending]) == (
        "deployment qwen is Pending: GPU 1 has 3.1 GiB free, needs 21 GiB"
    )
    failed = Engine(id="q-1", deployment="qwen", state=EngineState.FAILED, error="exit code 1")
    assert unavailable_reason(spec, [starting, failed]) == (
        "deployment qwen has no running replica (1 Failed, 1 Starting): exit code 1"
    )
    assert unavailable_reason(spec, []) == "deployment qwen is Pending (no engine created yet)"
    scaled = spec.model_copy(update={"replicas": 0})
    assert unavailable_reason(scaled, []) == "deployment qwen is scaled to 0 replicas"


def test_coming_says_whether_a_request_may_wait() -> None:
    spec = DeploymentSpec(name="q", model="m", replicas=2)
    S = EngineState

    def e(replica: int, state: EngineState, **kw: object) -> Engine:
        return Engine(id=f"q-{replica}", deployment="q", replica=replica, state=state, **kw)

    assert coming(spec, [])  # the controller creates the engines
    for state in (S.PENDING, S.SCHEDULED, S.DOWNLOADING, S.STARTING, S.LOST, S.STOPPING):
        assert coming(spec, [e(0, S.FAILED, permanent=True), e(1, state)]), state
    unplaced = e(1, S.PENDING, unplaced=True, reason="GPU 1 has 3.1 GiB free, needs 21 GiB")
    assert not coming(spec, [e(0, S.FAILED, permanent=True), unplaced])  # fails at once, saying why
    assert coming(spec, [e(0, S.FAILED, restarts=1), e(1, S.FAILED, permanent=True)])
    dead = [e(0, S.FAILED, restarts=5), e(1, S.FAILED, permanent=True)]
    assert not coming(spec, dead)
    assert coming(spec, dead, idle=True)  # scaled to zero: a request wakes it
    assert not coming(spec.model_copy(update={"replicas": 0}), [])
    # a replica this request found unreachable, still listed Running: its worker marks it soon
    assert coming(spec, [e(0, S.RUNNING), e(1, S.FAILED, permanent=True)], tried={"q-0"})
    # an engine beyond the wanted replicas (scaling down) is not on its way
    one = spec.model_copy(update={"replicas": 1})
    assert not coming(one, [e(0, S.FAILED, restarts=5), e(1, S.STARTING)])


async def test_table_follows_the_store_and_balances() -> None:
    store, fleet = MemoryStore(), FakeFleet()
    await put_deployment(store, "smol", served_model_name="smollm2")
    await put_engine(store, "smol", 0)
    table = RoutingTable(store, client_factory=fleet.factory)
    await table.start()
    try:
        spec = table.resolve("smollm2")
        assert spec.name == "smol" and table.resolve("smol") is spec
        with pytest.raises(APIError) as err:
            table.resolve("nope")
        assert err.value.status == 404

        # a second replica appears through the watch; both now take traffic
        await put_engine(store, "smol", 1, state=EngineState.STARTING)
        await _until(lambda: len(table.engines) == 2)
        a = table.acquire(spec)
        assert a.engine_id == "smol-0-x"  # the Starting one is not routable
        await put_engine(store, "smol", 1)
        await _until(lambda: table.engines["smol-1-x"].state is EngineState.RUNNING)
        b = table.acquire(spec)
        assert b.engine_id == "smol-1-x"  # least outstanding
        assert fleet.tokens == {"10.0.0.1:5000": "token-0", "10.0.0.2:5000": "token-1"}
        a.release()
        a.release()  # idempotent
        assert table.acquire(spec).engine_id == "smol-0-x"

        # the engine leaving Running takes it out of rotation
        await put_engine(store, "smol", 0, state=EngineState.STOPPING)
        await put_engine(store, "smol", 1, state=EngineState.FAILED, error="exit code 1")
        await _until(lambda: not table.serving())
        with pytest.raises(APIError) as err:
            table.acquire(spec)
        assert err.value.status == 503 and "exit code 1" in err.value.message

        await store.delete(keys.deployment("smol"))
        await _until(lambda: not table.deployments)
        with pytest.raises(APIError):
            table.resolve("smollm2")
    finally:
        await table.close()
        await store.close()


class CompactingStore(MemoryStore):
    """A store whose first watch reports compacted history (as etcd does after compaction)."""

    def __init__(self) -> None:
        super().__init__()
        self.compacted_once = False
        self.ranges = 0

    async def range(self, prefix: str) -> Any:
        self.ranges += 1
        return await super().range(prefix)

    def watch(self, prefix: str, *, start_revision: int = 0) -> Any:
        if prefix == keys.ENGINES and not self.compacted_once:
            self.compacted_once = True

            async def gone() -> AsyncIterator[Any]:
                raise RevisionCompactedError("compacted", compact_revision=99)
                yield  # pragma: no cover

            return gone()
        return super().watch(prefix, start_revision=start_revision)


async def test_table_resyncs_after_compaction() -> None:
    store = CompactingStore()
    await put_deployment(store, "smol")
    table = RoutingTable(store, client_factory=FakeFleet().factory)
    await table.start()
    try:
        await _until(lambda: store.ranges >= 3)  # engines prefix read again after the error
        await put_engine(store, "smol", 0)
        await _until(lambda: bool(table.serving()))
    finally:
        await table.close()
        await store.close()


class ForgettingStore(MemoryStore):
    """Each prefix's first watch finds the history compacted, after deployment "b"'s records
    were deleted unseen: the re-read must drop them."""

    def __init__(self) -> None:
        super().__init__()
        self.compacted: set[str] = set()

    def watch(self, prefix: str, *, start_revision: int = 0) -> Any:
        if prefix in self.compacted:
            return super().watch(prefix, start_revision=start_revision)
        self.compacted.add(prefix)
        forget = {keys.DEPLOYMENTS: "b", keys.ENGINES: "b-0-x", keys.ACTIVITY: "b"}[prefix]

        async def gone() -> AsyncIterator[Any]:
            await self.delete(prefix + forget)
            raise RevisionCompactedError("compacted", compact_revision=99)
            yield  # pragma: no cover

        return gone()


async def test_a_resync_drops_what_was_deleted_unseen() -> None:
    store = ForgettingStore()
    for name in ("a", "b"):
        await put_deployment(store, name)
        await put_engine(store, name, 0, endpoint=f"10.0.0.1:{ord(name)}")
        await store.put(keys.activity(name), Activity(deployment=name).encode())
    table = RoutingTable(store, client_factory=FakeFleet().factory, retry_delay_s=0.01)
    await table.start()
    try:
        await _until(lambda: "b" not in table.activity and "b" not in table.deployments)
        await _until(lambda: not table.engines_of("b"))
        assert (list(table.deployments), list(table.engines), list(table.activity)) == (
            ["a"],
            ["a-0-x"],
            ["a"],
        )
        assert [s.name for s in table.serving()] == ["a"]
    finally:
        await table.close()
        await store.close()


async def test_corrupt_record_is_skipped() -> None:
    store = MemoryStore()
    await store.put(keys.deployment("bad"), b"{not json")
    await put_deployment(store, "good")
    table = RoutingTable(store, client_factory=FakeFleet().factory)
    await table.start()
    try:
        assert list(table.deployments) == ["good"]
    finally:
        await table.close()
        await store.close()


async def _until(cond: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
