"""The cluster's figures at /metrics (gateway/cluster_metrics.py) over a memory store and a fake
engine fleet, scraped from a real uvicorn and read back with prometheus_client's own parser:
engines (polled in the background, never by a scrape), deployments, GPUs and the process
snapshots that controllers and workers publish in the store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from deepinfer_nb._proto import engine_service_pb2 as pb
from deepinfer_nb.config import Settings
from deepinfer_nb.control.metrics import ControllerCounters, WorkerCounters
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.models import (
    EngineState,
    GpuInfo,
    GpuProcess,
    GpuSamples,
    ProcessMetrics,
    StoreMetrics,
)
from deepinfer_nb.store import keys
from deepinfer_nb.store.memory import MemoryStore

from .fakes import FakeFleet, put_deployment, put_engine

ENGINE = {"deployment": "smol", "engine": "smol-0-x", "node": "n1", "model_name": "smollm2"}


def _metrics(gen_tokens: int) -> pb.MetricsResponse:
    return pb.MetricsResponse(
        running_requests=2,
        waiting_requests=1,
        kv_cache_usage=0.25,
        prompt_tokens_total=40,
        generation_tokens_total=gen_tokens,
        requests_finished_total=3,
        # per-bucket counts: 1 at <= 0.1, 2 in (0.1, 0.5], 1 above 0.5
        time_to_first_token_s=pb.Histogram(bounds=[0.1, 0.5], counts=[1, 2, 1], sum=1.5),
        inter_token_latency_s=pb.Histogram(bounds=[0.05], counts=[7, 0], sum=0.2),
    )


@pytest_asyncio.fixture
async def gateway() -> AsyncIterator[tuple[GatewayServer, MemoryStore, FakeFleet]]:
    store, fleet = MemoryStore(), FakeFleet()
    await put_deployment(store, "smol", served_model_name="smollm2", replicas=2)
    await put_engine(store, "smol", 0, node="n1", endpoint="10.0.0.1:5000")
    await put_engine(store, "smol", 1, node="n1", state=EngineState.STARTING)
    fleet.metrics["10.0.0.1:5000"] = _metrics(gen_tokens=100)
    settings = Settings()
    settings.server.metrics_interval_s = 3600.0  # one poll at start-up, then only on demand
    app = build_app(store, settings=settings, client_factory=fleet.factory)
    async with GatewayServer(app, host="127.0.0.1", port=0) as server:
        yield server, store, fleet
    await store.close()


async def _scrape(server: GatewayServer) -> dict[str, list[Sample]]:
    async with httpx.AsyncClient(base_url=server.url) as http:
        text = (await http.get("/metrics")).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples: list[Sample], sample: str = "", /, **labels: str) -> float:
    found = [
        s.value
        for s in samples
        if (not sample or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (sample, labels, samples)
    return found[0]


async def test_engine_and_deployment_series(
    gateway: tuple[GatewayServer, MemoryStore, FakeFleet],
) -> None:
    server, _, fleet = gateway
    fams = await _scrape(server)
    assert _value(fams["vllm:kv_cache_usage_perc"], **ENGINE) == 0.25
    assert _value(fams["vllm:num_requests_running"], **ENGINE) == 2
    assert _value(fams["vllm:num_requests_waiting"], **ENGINE) == 1
    assert _value(fams["vllm:generation_tokens"], **ENGINE) == 100
    assert _value(fams["vllm:prompt_tokens"], **ENGINE) == 40
    assert _value(fams["deepinfer_engine_up"], **ENGINE) == 1
    ttft = fams["vllm:time_to_first_token_seconds"]
    bucket = "vllm:time_to_first_token_seconds_bucket"
    assert [_value(ttft, bucket, le=le) for le in ("0.1", "0.5", "+Inf")] == [1, 3, 4]
    assert _value(ttft, "vllm:time_to_first_token_seconds_count") == 4
    assert _value(ttft, "vllm:time_to_first_token_seconds_sum") == 1.5
    state = fams["deepinfer_engine_state"]
    assert _value(state, engine="smol-0-x", state="Running") == 1
    assert _value(state, engine="smol-0-x", state="Failed") == 0
    assert _value(state, engine="smol-1-x", state="Starting") == 1
    assert _value(fams["deepinfer_deployment_desired_replicas"], deployment="smol") == 2
    assert _value(fams["deepinfer_deployment_ready_replicas"], deployment="smol") == 1
    # only Running engines are polled: the Starting one has no engine series
    assert {s.labels["engine"] for s in fams["vllm:kv_cache_usage_perc"]} == {"smol-0-x"}

    # A scrape renders the last poll and never asks an engine: a new figure shows after a poll.
    fleet.metrics["10.0.0.1:5000"] = _metrics(gen_tokens=150)
    assert _value((await _scrape(server))["vllm:generation_tokens"], **ENGINE) == 100
    await server.app.state.cluster_metrics.poll_once()
    assert _value((await _scrape(server))["vllm:generation_tokens"], **ENGINE) == 150


async def test_process_snapshots_and_gpus_from_the_store(
    gateway: tuple[GatewayServer, MemoryStore, FakeFleet],
) -> None:
    server, store, _ = gateway
    controller = ControllerCounters()
    controller.round_done(0.003)
    controller.round_done(0.2)
    controller.placements, controller.restarts = 3, 1
    controller.actions["schedule"] = 3
    worker = WorkerCounters()
    worker.launches["ready"] = 2
    snapshot = ProcessMetrics(
        process="host-1",
        controller=controller.snapshot(identity="c1", leader=True),
        worker=worker.snapshot(node="n1", lease=None, engines=1),
        store=StoreMetrics(url="etcd://x", retries=4, failures=1),
    )
    await store.put(keys.metrics("host-1"), snapshot.encode())
    gpu = GpuInfo(
        index=0,
        uuid="GPU-1",
        name="H100",
        memory_total=80 << 30,
        memory_used=9 << 30,
        utilization=55.0,
        power_draw=300.0,
        temperature=None,  # NVML could not read it: no series rather than a made-up 0
        processes=[
            GpuProcess(pid=10, used_memory=8 << 30, engine="smol-0-x", deployment="smol"),
            GpuProcess(pid=99, used_memory=1 << 30),
        ],
    )
    await store.put(keys.node_gpus("n1"), GpuSamples(node="n1", gpus=[gpu]).encode())
    await server.app.state.cluster_metrics.poll_once()
    fams = await _scrape(server)

    who = {"process": "host-1", "identity": "c1"}
    assert _value(fams["deepinfer_controller_leader"], **who) == 1
    assert _value(fams["deepinfer_controller_placements"], **who) == 3
    assert _value(fams["deepinfer_controller_restarts"], **who) == 1
    assert _value(fams["deepinfer_controller_actions"], action="schedule") == 3
    name = "deepinfer_controller_reconcile_duration_seconds"
    assert _value(fams[name], name + "_count") == 2
    assert _value(fams[name], name + "_bucket", le="0.005") == 1
    assert _value(fams["deepinfer_worker_launches"], node="n1", outcome="ready") == 2
    assert _value(fams["deepinfer_worker_launches"], node="n1", outcome="failed") == 0
    assert _value(fams["deepinfer_worker_engines"], node="n1") == 1
    assert _value(fams["deepinfer_store_retries"], process="host-1") == 4
    assert _value(fams["deepinfer_store_errors"], process="host-1") == 1

    gpu_labels = {"node": "n1", "gpu": "0", "uuid": "GPU-1", "name": "H100"}
    assert _value(fams["deepinfer_gpu_utilization_percent"], **gpu_labels) == 55
    assert _value(fams["deepinfer_gpu_memory_used_bytes"], **gpu_labels) == 9 << 30
    assert _value(fams["deepinfer_gpu_power_watts"], **gpu_labels) == 300
    assert fams["deepinfer_gpu_temperature_celsius"] == []
    procs = fams["deepinfer_gpu_process_memory_bytes"]
    assert _value(procs, pid="10", engine="smol-0-x", deployment="smol") == 8 << 30
    assert _value(procs, pid="99", engine="") == 1 << 30
    # /v1/gpus shows the same join (the worker wrote it into the samples)
    async with httpx.AsyncClient(base_url=server.url) as http:
        (node,) = (await http.get("/v1/gpus")).json()["data"]
    shown = [(p["pid"], p["engine"]) for p in node["gpus"][0]["processes"]]
    assert shown == [(10, "smol-0-x"), (99, "")]
