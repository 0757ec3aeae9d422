"""The fake fleet with the real controller: a GPU deployment is placed on a FakeNode's fake GPUs,
served by the real shim over the FakeBackend, answered through the gateway, and stopped."""

from __future__ import annotations

import asyncio
import time

import httpx

from deepinfer_nb.config import SchedulerSettings
from deepinfer_nb.control.controller import Controller
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState
from deepinfer_nb.store import decode_record, keys
from deepinfer_nb.testing import FakeBackend, FakeNode, MemoryStore

FAST = SchedulerSettings(reconcile_interval_s=0.1, leader_ttl_s=2)


async def _engines(store: MemoryStore) -> list[Engine]:
    result = await store.range(keys.ENGINES)
    out = [decode_record(Engine, kv.key, kv.value) for kv in result.items]
    return [e for e in out if e is not None]


async def _until(store: MemoryStore, done: object, timeout: float = 20.0) -> list[Engine]:
    deadline = time.monotonic() + timeout
    while True:
        engines = await _engines(store)
        if done(engines):  # type: ignore[operator]
            return engines
        assert time.monotonic() < deadline, [(e.id, e.state, e.reason) for e in engines]
        await asyncio.sleep(0.05)


async def test_gpu_deployment_runs_on_fake_gpus_and_stops() -> None:
    store = MemoryStore()
    controller = Controller(store, settings=FAST)
    running = asyncio.create_task(controller.run())
    replies = ["first", "second"]
    node = FakeNode(store, "gpu-a", gpus=2, backend=lambda e: FakeBackend(reply=replies[e.replica]))
    try:
        async with node, GatewayServer(build_app(store), host="127.0.0.1", port=0) as gw:
            spec = DeploymentSpec(name="big", model="fake/big", device="cuda", replicas=2)
            await store.put(keys.deployment("big"), spec.encode())
            engines = await _until(
                store, lambda es: len(es) == 2 and all(e.state is EngineState.RUNNING for e in es)
            )
            assert sorted(g for e in engines for g in e.gpus) == [0, 1]  # one fake GPU each
            assert {e.node for e in engines} == {"gpu-a"}
            async with httpx.AsyncClient(base_url=gw.url) as http:
                gpus = (await http.get("/v1/gpus")).json()["data"]
                assert [len(s["gpus"]) for s in gpus] == [2]
                for _ in range(50):  # the routing table follows the store
                    r = await http.post(
                        "/v1/chat/completions",
                        json={"model": "big", "messages": [{"role": "user", "content": "?"}]},
                    )
                    if r.status_code == 200:
                        break
                    await asyncio.sleep(0.05)
            assert r.json()["choices"][0]["message"]["content"] in ("first", "second")

            await store.put(
                keys.deployment("big"), spec.model_copy(update={"replicas": 0}).encode()
            )
            await _until(store, lambda es: not es)
            assert node.shims == {}
    finally:
        await controller.stop()
        await asyncio.gather(running, return_exceptions=True)
        await store.close()
