"""Requests wait for a replica on its way (hold.py): over the memory store and a fake fleet, with
the routing table following the store as in the gateway, and through the app on a real uvicorn
for what a client sees (503 with Retry-After; a retry after an unreachable engine)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from deepinfer_nb.config import Settings
from deepinfer_nb.gateway import GatewayServer, build_app, landing
from deepinfer_nb.gateway.errors import APIError
from deepinfer_nb.gateway.hold import HoldQueue
from deepinfer_nb.gateway.routing import RoutingTable
from deepinfer_nb.models import Activity, EngineState
from deepinfer_nb.store import decode_record, keys
from deepinfer_nb.store.memory import MemoryStore

from .fakes import Behaviour, FakeFleet, put_deployment, put_engine

S = EngineState


@pytest_asyncio.fixture
async def table() -> AsyncIterator[RoutingTable]:
    store = MemoryStore()
    table = RoutingTable(store, client_factory=FakeFleet().factory)
    await put_deployment(store, "smol", created_at=1.0)
    await put_engine(store, "smol", 0, state=S.STARTING)
    await table.start()
    yield table
    await table.close()
    await store.close()


def _store(table: RoutingTable) -> MemoryStore:
    store = table._store
    assert isinstance(store, MemoryStore)
    return store


async def test_held_until_the_engine_runs_then_served_at_once(table: RoutingTable) -> None:
    hold = HoldQueue(table, _store(table), timeout_s=30)
    spec = table.deployments["smol"]
    waiting = asyncio.create_task(hold.lease(spec))
    await asyncio.sleep(0.2)
    assert not waiting.done() and hold.held["smol"] == 1
    t0 = time.perf_counter()
    await put_engine(_store(table), "smol", 0, state=S.RUNNING, endpoint="10.0.0.9:5000")
    lease = await asyncio.wait_for(waiting, 5)
    assert time.perf_counter() - t0 < 0.5  # woken by the store watch, not a poll
    assert lease.replica.engine.endpoint == "10.0.0.9:5000"
    lease.release()
    assert hold.held == {}


async def test_past_the_timeout_a_503_with_retry_after(table: RoutingTable) -> None:
    hold = HoldQueue(table, _store(table), timeout_s=0.3)
    with pytest.raises(APIError) as err:
        await hold.lease(table.deployments["smol"])
    assert (err.value.status, err.value.code) == (503, "replica_starting")
    assert "deployment smol is Starting" in err.value.message
    assert err.value.headers == {"Retry-After": "1"}


async def test_the_queue_is_bounded(table: RoutingTable) -> None:
    hold = HoldQueue(table, _store(table), timeout_s=30, max_held=2)
    spec = table.deployments["smol"]
    waiting = [asyncio.create_task(hold.lease(spec)) for _ in range(2)]
    await asyncio.sleep(0.1)
    with pytest.raises(APIError) as err:
        await hold.lease(spec)
    assert (err.value.status, err.value.code) == (503, "hold_queue_full")
    assert "Retry-After" in err.value.headers
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert hold.held == {}  # a cancelled wait (a client that left) frees its place


async def test_hold_timeout_zero_answers_at_once_and_still_wakes(table: RoutingTable) -> None:
    store = _store(table)
    hold = HoldQueue(table, store, timeout_s=0)
    with pytest.raises(APIError) as err:  # as before there was a hold queue
        await hold.lease(table.deployments["smol"])
    assert err.value.code == "no_running_replica" and "smol is Starting" in err.value.message
    idle = Activity(deployment="smol", last_request_at=1.0, idle=True, idle_since=2.0)
    await store.put(keys.activity("smol"), idle.encode())
    await asyncio.sleep(0.05)
    with pytest.raises(APIError, match=r"idle \(scaled to zero\); a request wakes it"):
        await hold.lease(table.deployments["smol"])
    for _ in range(50):  # the wake is written in the background
        kv = await store.get(keys.activity("smol"))
        if kv is not None and b'"idle":false' in kv.value:
            break
        await asyncio.sleep(0.02)
    assert kv is not None and b'"idle":false' in kv.value
    await hold.close()


async def test_nothing_on_its_way_fails_at_once(table: RoutingTable) -> None:
    store = _store(table)
    hold = HoldQueue(table, store, timeout_s=30)
    await put_engine(store, "smol", 0, state=S.FAILED, permanent=True, error="model not found")
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    with pytest.raises(APIError) as err:
        await hold.lease(table.deployments["smol"])
    assert err.value.code == "no_running_replica" and "model not found" in err.value.message
    await put_engine(store, "smol", 0, state=S.FAILED, restarts=5, error="crashed")
    await asyncio.sleep(0.05)
    with pytest.raises(APIError, match="crashed"):  # out of restarts (max_restarts 5)
        await hold.lease(table.deployments["smol"])
    await put_deployment(store, "smol", replicas=0)
    await asyncio.sleep(0.05)
    with pytest.raises(APIError, match="scaled to 0 replicas"):
        await hold.lease(table.deployments["smol"])
    assert time.perf_counter() - t0 < 1.0


async def test_a_request_wakes_an_idle_deployment_and_waits(table: RoutingTable) -> None:
    store = _store(table)
    await store.delete(keys.engine("smol-0-x"))
    idle = Activity(deployment="smol", last_request_at=1.0, idle=True, idle_since=2.0)
    await store.put(keys.activity("smol"), idle.encode())
    await asyncio.sleep(0.05)
    assert [s.name for s in table.serving()] == ["smol"]  # listed: a request wakes it
    assert landing.summary(table)[0]["state"] == "Idle (scaled to zero)"  # the page at /
    hold = HoldQueue(table, store, timeout_s=30)
    waiting = asyncio.create_task(hold.lease(table.deployments["smol"]))
    for _ in range(50):
        kv = await store.get(keys.activity("smol"))
        assert kv is not None
        record = decode_record(Activity, kv.key, kv.value)
        if record is not None and not record.idle:
            break
        await asyncio.sleep(0.02)
    assert record is not None and not record.idle and record.last_request_at > 2.0
    assert not waiting.done()
    await put_engine(store, "smol", 0, state=S.RUNNING)
    (await asyncio.wait_for(waiting, 5)).release()
    await hold.close()


async def test_unreachable_engine_request_waits_for_its_restart() -> None:
    """The engine died and its record still says Running: the request that found it
    unreachable waits, and is served by the engine's next run (a new endpoint)."""
    store, fleet = MemoryStore(), FakeFleet()
    await put_deployment(store, "smol")
    await put_engine(store, "smol", 0, endpoint="10.0.0.1:5000")
    fleet.behaviour["10.0.0.1:5000"] = Behaviour(mode="unavailable")
    app = build_app(store, settings=Settings(), client_factory=fleet.factory)
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with GatewayServer(app, host="127.0.0.1", port=0) as gw:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
                request = asyncio.create_task(http.post("/v1/chat/completions", json=body))
                stream = asyncio.create_task(
                    http.post("/v1/chat/completions", json={**body, "stream": True})
                )
                for _ in range(200):  # both find the dead engine, then wait
                    if fleet.calls["10.0.0.1:5000"] == 2:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.1)
                assert not request.done() and not stream.done()
                await put_engine(store, "smol", 0, state=S.FAILED, error="killed", restarts=1)
                await asyncio.sleep(0.1)
                assert not request.done()
                await put_engine(store, "smol", 0, endpoint="10.0.0.7:5000", restarts=1)
                reply, streamed = await asyncio.wait_for(asyncio.gather(request, stream), 10)
        assert reply.status_code == 200, reply.text
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
        assert streamed.status_code == 200 and "Paris" in streamed.text
        assert fleet.calls == {"10.0.0.1:5000": 2, "10.0.0.7:5000": 2}
    finally:
        await store.close()


def _held(text: str) -> dict[str, float]:
    families = text_string_to_metric_families(text)
    (family,) = [f for f in families if f.name == "deepinfer_gateway_held_requests"]
    assert family.type == "gauge"
    return {s.labels["deployment"]: s.value for s in family.samples}


async def test_held_requests_are_a_gauge_at_metrics() -> None:
    """Operators see requests waiting for a Starting replica, per deployment, at /metrics."""
    store = MemoryStore()
    await put_deployment(store, "smol")
    await put_deployment(store, "other")
    await put_engine(store, "smol", 0, state=S.STARTING)
    app = build_app(store, settings=Settings(), client_factory=FakeFleet().factory)
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with GatewayServer(app, host="127.0.0.1", port=0) as gw:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
                assert _held((await http.get("/metrics")).text) == {"smol": 0, "other": 0}
                waiting = [
                    asyncio.create_task(http.post("/v1/chat/completions", json=body))
                    for _ in range(2)
                ]
                for _ in range(200):
                    if (held := _held((await http.get("/metrics")).text))["smol"] == 2:
                        break
                    await asyncio.sleep(0.02)
                assert held == {"smol": 2, "other": 0}
                await put_engine(store, "smol", 0, state=S.RUNNING)
                replies = await asyncio.wait_for(asyncio.gather(*waiting), 10)
                assert [r.status_code for r in replies] == [200, 200]
                assert _held((await http.get("/metrics")).text) == {"smol": 0, "other": 0}
    finally:
        await store.close()
