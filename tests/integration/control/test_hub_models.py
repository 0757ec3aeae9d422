"""Hub models as users meet them, against the local hub double (tests/fixtures/hub.py) serving the
built SmolLM2 folder: a real in-process cluster (memory store, controller, worker with its node
cache in a temp folder, gateway on 127.0.0.1) and one real vLLM engine on CPU.

In file order, sharing the cluster:
1. an unknown repo -> Failed at once, permanent, 0 restarts, the line that says what to do;
2. a gated repo without HF_TOKEN -> Failed, 0 restarts, naming HF_TOKEN;
3. with HF_TOKEN: deploy by repo id -> Downloading with progress in the record (and in
   GET /v1/deployments/{name}), the connection dropped mid-file and resumed -> Running -> Paris;
4. a second deployment of the same repo downloads nothing and skips Downloading.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from deepinfer_nb.config import Settings
from deepinfer_nb.control.controller import Controller
from deepinfer_nb.control.worker import Worker
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.models import Engine, EngineState
from deepinfer_nb.store import MetaStore, decode_record, keys
from deepinfer_nb.store.memory import MemoryStore
from tests.fixtures.hub import HubDouble, smollm2_folder

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

S = EngineState
GATED = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOKEN = "hf_test_token_for_the_double"
START_TIMEOUT_S = 600.0
DROP_AT = 30_000_000
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@dataclasses.dataclass
class HubCluster:
    store: MetaStore
    worker: Worker
    hub: HubDouble
    url: str
    seen: dict[str, list[Engine]]
    """Every engine record version the watcher saw, by deployment."""

    async def engines(self, deployment: str) -> list[Engine]:
        result = await self.store.range(keys.ENGINES)
        out = [decode_record(Engine, kv.key, kv.value) for kv in result.items]
        return [e for e in out if e is not None and e.deployment == deployment]

    async def wait_for(self, deployment: str, states: set[S], timeout: float) -> Engine:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in await self.engines(deployment):
                if e.state in states:
                    return e
            await asyncio.sleep(0.1)
        found = await self.engines(deployment)
        logs = "\n".join("\n".join(self.worker.logs(e.id, 30)) for e in found)
        pytest.fail(f"{deployment}: no engine in {states}: {found}\n{logs}")

    async def post(self, body: dict[str, object]) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            return await http.post("/v1/deployments", json=body)

    async def get(self, name: str) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            resp = await http.get(f"/v1/deployments/{name}")
        data: dict[str, Any] = resp.json()
        return data

    async def delete(self, name: str) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            await http.delete(f"/v1/deployments/{name}")


async def _watch(store: MetaStore, seen: dict[str, list[Engine]]) -> None:
    async for event in store.watch(keys.ENGINES):
        if event.value:
            e = decode_record(Engine, event.key, event.value)
            if e is not None:
                seen.setdefault(e.deployment, []).append(e)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster() -> AsyncIterator[HubCluster]:
    home = Path(tempfile.mkdtemp(prefix="deepinfer-hub-"))
    # ~70 MB/s: the 269 MB weights take about 4 s, so progress is written several times.
    hub = HubDouble(
        repos={GATED: smollm2_folder()},
        gated={GATED: TOKEN},
        drop_after={"model.safetensors": DROP_AT},
        bytes_per_s=70e6,
    ).start()
    settings = Settings()
    settings.scheduler.reconcile_interval_s = 0.5
    settings.scheduler.restart_backoff_s = 0.5
    settings.agent.hub_endpoint = hub.url
    settings.agent.hub_cache = str(home / "hub")
    settings.agent.start_timeout_s = START_TIMEOUT_S
    saved_token = os.environ.pop("HF_TOKEN", None)
    store = MemoryStore()
    controller = Controller(store, settings=settings.scheduler)
    running = asyncio.create_task(controller.run())
    worker = Worker(store, node_id="vm", settings=settings, home=home)
    await worker.start()
    server = GatewayServer(build_app(store, settings=settings), host="127.0.0.1", port=0)
    await server.start()
    seen: dict[str, list[Engine]] = {}
    watcher = asyncio.create_task(_watch(store, seen))
    try:
        yield HubCluster(store, worker, hub, server.url, seen)
    finally:
        watcher.cancel()
        await server.stop()
        await worker.stop()
        await controller.stop()
        await asyncio.gather(running, watcher, return_exceptions=True)
        await store.close()
        hub.stop()
        shutil.rmtree(home, ignore_errors=True)  # its node cache holds a 270 MB model copy
        os.environ.pop("HF_TOKEN", None)
        if saved_token is not None:
            os.environ["HF_TOKEN"] = saved_token


async def _stays_failed(cluster: HubCluster, name: str) -> Engine:
    """Failed at once and still Failed, never restarted, a few backoff periods later."""
    failed = await cluster.wait_for(name, {S.FAILED}, 60)
    await asyncio.sleep(3.0)  # backoff is 0.5 s: a restart would have happened by now
    (now,) = await cluster.engines(name)
    assert now.state is S.FAILED and now.restarts == 0 and now.permanent
    assert S.STARTING not in [e.state for e in cluster.seen[name]]  # no engine was launched
    return failed


async def test_unknown_repo_fails_at_once_without_restarts(cluster: HubCluster) -> None:
    resp = await cluster.post({"model": "nobody/no-such-model", "name": "missing", "device": "cpu"})
    assert resp.status_code == 201, resp.text
    failed = await _stays_failed(cluster, "missing")
    assert failed.error.startswith(f"nobody/no-such-model was not found on {cluster.hub.url}")
    assert "check the model id" in failed.error
    shown = await cluster.get("missing")
    assert shown["engines"][0]["permanent"] is True
    await cluster.delete("missing")


async def test_gated_repo_without_token_names_hf_token(cluster: HubCluster) -> None:
    resp = await cluster.post({"model": GATED, "name": "gated", "device": "cpu"})
    assert resp.status_code == 201, resp.text
    failed = await _stays_failed(cluster, "gated")
    assert failed.error == (
        f"{GATED} is gated: accept its terms on the hub and set HF_TOKEN in the worker's "
        "environment on node vm"
    )
    await cluster.delete("gated")
    await asyncio.sleep(1.0)


async def test_deploy_by_repo_id_downloads_with_progress_resumes_and_serves(
    cluster: HubCluster,
) -> None:
    os.environ["HF_TOKEN"] = TOKEN  # the worker's environment (in-process worker)
    cluster.hub.reset_counters()
    resp = await cluster.post({"model": GATED, "name": "smol", "device": "cpu"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["effective"]["mode"] == "eager"
    downloading = await cluster.wait_for("smol", {S.DOWNLOADING}, 60)
    assert downloading.download is None or downloading.download.repo == GATED
    # GET shows the progress while it downloads
    shown = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = await cluster.get("smol")
        engine = view["engines"][0]
        if engine["state"] != "Downloading":
            break
        if engine["download"] and engine["download"]["done"] > 0:
            shown = engine["download"]
            break
        await asyncio.sleep(0.2)
    assert shown is not None and 0 < shown["done"] <= shown["total"] and shown["rate"] > 0
    running = await cluster.wait_for("smol", {S.RUNNING, S.FAILED}, START_TIMEOUT_S)
    assert running.state is S.RUNNING, running.error
    # progress events: several distinct byte counts, the last one complete
    progress = [e.download for e in cluster.seen["smol"] if e.download is not None]
    done = [p.done for p in progress]
    assert len(set(done)) >= 2 and done == sorted(done), done
    total = progress[-1].total
    assert total == sum(p.stat().st_size for p in smollm2_folder().iterdir() if p.name[0] != ".")
    states = [e.state for e in cluster.seen["smol"]]
    assert states.index(S.DOWNLOADING) < states.index(S.STARTING) < states.index(S.RUNNING)
    # the connection dropped after 30 MB and the download resumed with a Range request
    gets = cluster.hub.file_gets("model.safetensors")
    assert gets[0] == "" and gets[1].startswith("bytes=") and len(gets) == 2
    assert running.settings is not None and running.settings.mode == "eager"
    async with openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="none") as client:
        reply = await client.chat.completions.create(
            model="smol",
            messages=FRANCE,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=24,
        )
    assert "Paris" in (reply.choices[0].message.content or "")


async def test_second_deployment_of_the_repo_downloads_nothing(cluster: HubCluster) -> None:
    cluster.hub.reset_counters()
    started = time.monotonic()
    resp = await cluster.post({"model": GATED, "name": "smol-two", "device": "cpu"})
    assert resp.status_code == 201, resp.text
    starting = await cluster.wait_for("smol-two", {S.STARTING, S.RUNNING, S.FAILED}, 60)
    assert starting.state is not S.FAILED, starting.error
    states = [t.state for t in starting.history]
    assert S.DOWNLOADING not in states
    assert time.monotonic() - started < 10
    assert [r for r in cluster.hub.requests if "/resolve/" in r[1]] == []
    assert cluster.hub.bytes_sent == 0
    await cluster.delete("smol-two")  # its engine is not needed: the skip was the point
    await asyncio.sleep(1.0)
