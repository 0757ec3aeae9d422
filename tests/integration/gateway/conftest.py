"""One real cluster for every gateway integration test (module-scoped: started once, and its
engines gone before the next module starts its own):
the embedded memory store, the in-process controller and worker, a deployment "smol" of the
locally built SmolLM2-135M-Instruct with 2 replicas on CPU (two real shim + vLLM processes), and
the gateway on a real uvicorn on 127.0.0.1 with three API keys: `API_KEY` (a bare key: both
scopes, as a single configured key always had), the admin key "ops" and the inference key "app".
The deployment is written straight into the store, so the worker's launch policy is what admits
it (an allowed spec: a catalog model, an engine tunable in `env`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from deepinfer_nb.config import INFERENCE, ApiKey, Settings
from deepinfer_nb.control.controller import Controller
from deepinfer_nb.control.worker import Worker
from deepinfer_nb.engine import local_models
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState
from deepinfer_nb.store import MetaStore, decode_record, keys
from deepinfer_nb.store.memory import MemoryStore

MODEL = "smollm2-135m-instruct"
API_KEY = "sk-deepinfer-test"
ADMIN_KEY = "sk-deepinfer-ops"
INFERENCE_KEY = "sk-deepinfer-app"
KEYS = [
    API_KEY,
    ApiKey("ops", ADMIN_KEY),
    ApiKey("app", INFERENCE_KEY, frozenset({INFERENCE})),
]
START_TIMEOUT_S = 600.0


@dataclasses.dataclass
class GatewayCluster:
    store: MetaStore
    server: GatewayServer
    worker: Worker
    settings: Settings

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, *, key: str = API_KEY, **kw: object) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, **kw)  # type: ignore[arg-type]

    async def engines(self) -> list[Engine]:
        result = await self.store.range(keys.ENGINES)
        out = [decode_record(Engine, kv.key, kv.value) for kv in result.items]
        return sorted((e for e in out if e is not None), key=lambda e: e.replica)


async def _wait_running(store: MetaStore, worker: Worker, n: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        result = await store.range(keys.ENGINES)
        engines = [decode_record(Engine, kv.key, kv.value) for kv in result.items]
        states = [e.state for e in engines if e is not None]
        if states.count(EngineState.RUNNING) == n:
            return
        failed = [e for e in engines if e is not None and e.state is EngineState.FAILED]
        if failed or time.monotonic() > deadline:
            logs = "\n".join("\n".join(worker.logs(e.id, 30)) for e in engines if e is not None)
            pytest.fail(f"engines not Running ({states}): {[e.error for e in failed]}\n{logs}")
        await asyncio.sleep(0.5)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gateway_cluster() -> AsyncIterator[GatewayCluster]:
    local_models.build(local_models.CATALOG[MODEL])  # idempotent
    settings = Settings()
    settings.scheduler.reconcile_interval_s = 0.5
    store = MemoryStore()
    controller = Controller(store, settings=settings.scheduler)
    running = asyncio.create_task(controller.run())
    home = Path(tempfile.mkdtemp(prefix="deepinfer-gw-"))
    worker = Worker(store, node_id="gw-node", settings=settings, home=home)
    await worker.start()
    spec = DeploymentSpec(
        name="smol",
        model=MODEL,
        served_model_name="smollm2",
        replicas=2,
        device="cpu",
        enforce_eager=True,
        max_model_len=2048,
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    await store.put(keys.deployment("smol"), spec.encode())
    server = GatewayServer(
        build_app(store, settings=settings, api_keys=KEYS), host="127.0.0.1", port=0
    )
    await server.start()
    try:
        await _wait_running(store, worker, 2)
        yield GatewayCluster(store, server, worker, settings)
    finally:
        await server.stop()
        await worker.stop()
        await controller.stop()
        await asyncio.gather(running, return_exceptions=True)
        await store.close()
