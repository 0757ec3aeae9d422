"""Changing a deployment over HTTP: PUT (apply), PATCH of any engine setting, rollback,
rolling restart; each says created/updated/unchanged and shows the rollout."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio

from deepinfer_nb import specs
from deepinfer_nb.config import Settings
from deepinfer_nb.defaults import CPU_MAX_MODEL_LEN
from deepinfer_nb.gateway import GatewayServer
from deepinfer_nb.models import DeploymentSpec, Engine, EngineSettings, EngineState, ModelFacts
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


def _model(folder: Path, *, positions: int) -> str:
    folder.mkdir()
    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1}
    config |= {"vocab_size": 128, "max_position_embeddings": positions}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


async def test_a_model_change_brings_the_new_models_facts(tmp_path: Path) -> None:
    """PATCH, PUT and rollback of `model` re-read the facts (context window, size) of the model
    now deployed; the views show the new model's effective settings, not the old engine's."""
    settings = Settings()
    settings.agent.model_dirs = [str(tmp_path)]
    store = MemoryStore()
    try:
        async with GatewayServer(store, settings=settings, host="127.0.0.1", port=0) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                await _change_models(client, store, tmp_path)
    finally:
        await store.close()


async def _change_models(client: httpx.AsyncClient, store: MemoryStore, tmp_path: Path) -> None:
    short = _model(tmp_path / "short", positions=512)
    long = _model(tmp_path / "long", positions=32768)
    r = await client.put("/v1/deployments/d", json={"model": short, "device": "cpu"})
    assert r.json()["facts"]["max_position_embeddings"] == 512
    assert r.json()["effective"]["max_model_len"] is None  # the model's own 512
    old = await _stored(store, "d")
    old_settings = EngineSettings(
        device="cpu", dtype="float32", enforce_eager=True, mode="eager", max_model_len=None
    )
    await put_engine(store, "d", 0, spec_hash=specs.spec_hash(old), settings=old_settings)

    view = (await client.patch("/v1/deployments/d", json={"model": long})).json()
    assert view["change"] == "updated" and view["model"] == long
    assert view["facts"]["max_position_embeddings"] == 32768
    assert (await _stored(store, "d")).facts == view_facts(view)
    assert view["effective"]["max_model_len"] == CPU_MAX_MODEL_LEN  # capped on CPU, not None
    assert view["rollout_status"]["state"] == "progressing"

    view = (await client.post("/v1/deployments/d/rollback")).json()
    assert view["model"] == short and view["facts"]["max_position_embeddings"] == 512

    view = (await client.put("/v1/deployments/d", json={"model": long, "device": "cpu"})).json()
    assert view["facts"]["max_position_embeddings"] == 32768
    view = (await client.patch("/v1/deployments/d", json={"model": "no-such-model"})).json()
    assert view["model"] == "no-such-model" and view["facts"] is None  # unknown, not the old


def view_facts(view: dict[str, Any]) -> ModelFacts:
    return ModelFacts.model_validate(view["facts"])
