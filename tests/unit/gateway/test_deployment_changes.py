"""Changing a deployment over HTTP: PUT (apply), PATCH of any engine setting, rollback,
rolling restart; each says created/updated/unchanged and shows the rollout."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest_asyncio

from deepinfer_nb import specs
from deepinfer_nb.gateway import GatewayServer
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState
from deepinfer_nb.store import decode_record, keys
from deepinfer_nb.store.memory import MemoryStore

from .fakes import put_engine


@pytest_asyncio.fixture
async def http() -> AsyncIterator[tuple[httpx.AsyncClient, MemoryStore]]:
    store = MemoryStore()
    async with GatewayServer(store, host="127.0.0.1", port=0) as gw:
        async with httpx.AsyncClient(base_url=gw.url) as client:
            yield client, store
    await store.close()


async def _stored(store: MemoryStore, name: str) -> DeploymentSpec:
    kv = await store.get(keys.deployment(name))
    assert kv is not None
    spec = decode_record(DeploymentSpec, kv.key, kv.value)
    assert spec is not None
    return spec


async def test_put_patch_rollback_restart(http: tuple[httpx.AsyncClient, MemoryStore]) -> None:
    client, store = http
    body = {"model": "m", "device": "cpu", "max_model_len": 2048, "replicas": 2}
    r = await client.put("/v1/deployments/d", json=body)
    assert (r.status_code, r.json()["change"]) == (201, "created")
    assert (await client.put("/v1/deployments/d", json=body)).json()["change"] == "unchanged"
    first = await _stored(store, "d")

    # an engine setting changes: updated, the old settings kept for rollback, rollout shown
    await put_engine(store, "d", 0, spec_hash=specs.spec_hash(first))
    r = await client.patch("/v1/deployments/d", json={"max_model_len": 1024})
    view = r.json()
    assert view["change"] == "updated" and view["max_model_len"] == 1024
    assert view["previous"]["max_model_len"] == 2048
    assert (
        view["rollout_status"]["state"] == "progressing" and view["rollout_status"]["can_roll_back"]
    )
    second = await _stored(store, "d")
    assert specs.spec_hash(second) != specs.spec_hash(first)

    # scaling alone is not a rollout and keeps the rollback target
    r = await client.patch("/v1/deployments/d", json={"replicas": 1})
    assert r.json()["change"] == "updated" and r.json()["previous"]["max_model_len"] == 2048
    assert specs.spec_hash(await _stored(store, "d")) == specs.spec_hash(second)

    r = await client.post("/v1/deployments/d/rollback")
    assert r.json()["max_model_len"] == 2048 and r.json()["previous"]["max_model_len"] == 1024
    assert specs.spec_hash(await _stored(store, "d")) == specs.spec_hash(first)

    r = await client.post("/v1/deployments/d/restart")
    assert r.json()["restart_generation"] == 1
    assert specs.spec_hash(await _stored(store, "d")) != specs.spec_hash(first)

    # PUT replaces: fields not given go back to their defaults
    r = await client.put("/v1/deployments/d", json={"model": "m2", "device": "cpu"})
    assert r.json()["change"] == "updated" and r.json()["max_model_len"] is None
    assert r.json()["replicas"] == 1 and r.json()["model"] == "m2"


async def test_change_errors(http: tuple[httpx.AsyncClient, MemoryStore]) -> None:
    client, _ = http
    await client.post(
        "/v1/deployments", json={"name": "d", "model": "m", "env": {"OMP_NUM_THREADS": "2"}}
    )
    r = await client.post("/v1/deployments/d/rollback")
    assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_roll_back"
    r = await client.put("/v1/deployments/d", json={"name": "e", "model": "m"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "name"
    for field in ("previous", "restart_generation", "created_at", "name"):
        r = await client.patch("/v1/deployments/d", json={field: 1})
        assert r.status_code == 422 and r.json()["error"]["param"] == field
    assert (await client.post("/v1/deployments/nope/restart")).status_code == 404
    r = await client.patch("/v1/deployments/d", json={"env": {"OMP_NUM_THREADS": "1"}})
    assert r.json()["previous"]["env"] == {
        "OMP_NUM_THREADS": "***"
    }  # secrets stay hidden in history too
    r = await client.patch(
        "/v1/deployments/d", json={"rollout": {"max_surge": 0, "max_unavailable": 0}}
    )
    assert r.status_code == 422 and "cannot both be 0" in r.text


async def test_halted_rollout_is_reported(http: tuple[httpx.AsyncClient, MemoryStore]) -> None:
    client, store = http
    await client.put("/v1/deployments/d", json={"model": "m", "replicas": 1})
    old = await _stored(store, "d")
    await put_engine(store, "d", 0, spec_hash=specs.spec_hash(old))
    await client.patch("/v1/deployments/d", json={"max_model_len": 999999})
    new = await _stored(store, "d")
    failed = Engine(
        id="d-0-new",
        deployment="d",
        replica=0,
        state=EngineState.FAILED,
        error="max_model_len 999999 exceeds the model",
        spec_hash=specs.spec_hash(new),
    )
    await store.put(keys.engine(failed.id), failed.encode())
    view = (await client.get("/v1/deployments/d")).json()
    assert view["rollout_status"]["state"] == "halted"
    assert "d-0-new failed: max_model_len 999999 exceeds" in view["rollout_status"]["reason"]


async def test_idle_timeout_over_http_is_no_rollout(
    http: tuple[httpx.AsyncClient, MemoryStore],
) -> None:
    client, store = http
    r = await client.post("/v1/deployments", json={"model": "m", "name": "d", "device": "cpu"})
    first = await _stored(store, "d")
    r = await client.patch("/v1/deployments/d", json={"idle_timeout": "15m"})
    view = r.json()
    assert (view["change"], view["idle_timeout"], view["idle"]) == ("updated", 900.0, False)
    assert view["previous"] is None and view["rollout_status"]["state"] == "complete"
    assert specs.spec_hash(await _stored(store, "d")) == specs.spec_hash(first)
    r = await client.patch("/v1/deployments/d", json={"idle_timeout": "soon"})
    assert r.status_code == 422 and "not a duration" in r.json()["error"]["message"]
    # deleting it forgets its activity: a new deployment of the name starts awake
    await store.put(keys.activity("d"), b'{"deployment": "d", "idle": true, "idle_since": 1e12}')
    assert (await client.get("/v1/deployments/d")).json()["idle"] is True
    assert (await client.delete("/v1/deployments/d")).status_code == 200
    assert await store.get(keys.activity("d")) is None
