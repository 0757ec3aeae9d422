"""Issue 18's operator metrics, for real: the composition root (`ServiceSet`: controller, worker,
gateway over the memory store, as a notebook or `deepinfer-nb up` runs them) serving a real
llama.cpp engine (the SmolLM2 GGUF), scraped during load with prometheus_client's own parser;
then the shipped scrape config and Grafana dashboard checked by Prometheus' own tools, the
dashboard's series against what the gateway really exports, and a real Prometheus scraping the
gateway once.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from deepinfer_nb.config import Settings
from deepinfer_nb.gateway.cluster_metrics import gpu_families
from deepinfer_nb.models import DeploymentSpec, GpuInfo, GpuProcess, GpuSamples
from deepinfer_nb.netutil import free_port
from deepinfer_nb.services import ServiceSet
from deepinfer_nb.store import keys

from .conftest import MODEL, _wait_running

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[3]
NAME = "smol-gguf"
STREAMS = 4
Families = dict[str, list[Sample]]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def services() -> AsyncIterator[ServiceSet]:
    settings = Settings()
    settings.scheduler.reconcile_interval_s = 0.5
    settings.server.metrics_interval_s = 0.2  # engine polls and process snapshots
    settings.agent.heartbeat_ttl_s = 3  # a lease renewal every second
    services = ServiceSet(settings)
    try:
        store = await services.open_store("memory://")
        await services.start_controller()
        worker = await services.start_worker(node=f"metrics-{uuid.uuid4().hex[:6]}")
        await services.start_gateway(host="127.0.0.1", port=0, api_keys=[])
        spec = DeploymentSpec(name=NAME, model=MODEL + "-gguf", max_model_len=2048)
        await store.put(keys.deployment(NAME), spec.encode())
        await _wait_running(store, worker, 1)
        yield services
    finally:
        await services.aclose()


def _url(services: ServiceSet) -> str:
    assert services.gateway is not None
    return services.gateway.url


async def _scrape(http: httpx.AsyncClient) -> Families:
    text = (await http.get("/metrics")).raise_for_status().text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def _polled(http: httpx.AsyncClient, timeout: float = 10.0) -> Families:
    """A scrape once the gateway's background poll has seen the Running engine."""
    deadline = time.monotonic() + timeout
    while not (fams := await _scrape(http)).get("vllm:generation_tokens"):  # not (yet) answered
        assert time.monotonic() < deadline, "the engine's metrics never reached /metrics"
        await asyncio.sleep(0.1)
    return fams


def _one(fams: Families, family: str, sample: str = "", /, **labels: str) -> float:
    found = [
        s.value
        for s in fams.get(family, [])
        if (not sample or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (family, sample, labels, fams.get(family))
    return found[0]


async def _stream(client: openai.AsyncOpenAI, i: int) -> Any:
    stream = await client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": f"Tell a long story about cat number {i}."}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    return usage


async def test_every_family_moves_under_load(services: ServiceSet) -> None:
    async with httpx.AsyncClient(base_url=_url(services)) as http:
        before = await _polled(http)
        (engine,) = {s.labels["engine"] for s in before["vllm:generation_tokens"]}
        who = {"deployment": NAME, "engine": engine}
        gen0 = _one(before, "vllm:generation_tokens", **who)
        prompt0 = _one(before, "vllm:prompt_tokens", **who)
        ttft = "vllm:time_to_first_token_seconds"
        ttft0 = _one(before, ttft, ttft + "_count", **who)
        itl = "vllm:inter_token_latency_seconds"
        itl0 = _one(before, itl, itl + "_count", **who)

        seen = {"kv": 0.0, "running": 0.0, "waiting": 0.0}
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                fams = await _scrape(http)
                # a poll the busy engine did not answer in time has no figures (engine_up 0)
                if _one(fams, "deepinfer_engine_up", **who):
                    for key, family in (
                        ("kv", "vllm:kv_cache_usage_perc"),
                        ("running", "vllm:num_requests_running"),
                        ("waiting", "vllm:num_requests_waiting"),
                    ):
                        seen[key] = max(seen[key], _one(fams, family, **who))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        async with openai.AsyncOpenAI(
            base_url=_url(services) + "/v1", api_key="-", max_retries=0
        ) as client:
            usages = await asyncio.gather(*(_stream(client, i) for i in range(STREAMS)))
        done.set()
        await watcher
        # llama.cpp runs one sequence at a time: the others wait their turn, and the context
        # the running one fills is the KV cache in use
        assert seen["kv"] > 0 and seen["running"] == 1 and seen["waiting"] >= 1, seen

        completion = sum(u.completion_tokens for u in usages)
        prompt = sum(u.prompt_tokens for u in usages)
        deadline = time.monotonic() + 10
        while True:  # the next polls catch up with the end of the load
            after = await _polled(http)
            settled = (
                _one(after, "vllm:num_requests_running", **who) == 0
                and _one(after, "vllm:generation_tokens", **who) >= gen0 + completion
            )
            if settled or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    assert _one(after, "vllm:num_requests_running", **who) == 0
    assert _one(after, "vllm:num_requests_waiting", **who) == 0
    assert _one(after, "vllm:kv_cache_usage_perc", **who) == 0
    # the engine's own counts, through GetMetrics, agree with the usage the clients got
    assert _one(after, "vllm:generation_tokens", **who) == gen0 + completion
    assert _one(after, "vllm:prompt_tokens", **who) == prompt0 + prompt
    # one time-to-first-token per request, one inter-token latency per token after the first
    assert _one(after, ttft, ttft + "_count", **who) == ttft0 + STREAMS
    assert _one(after, itl, itl + "_count", **who) == itl0 + completion - STREAMS
    assert _one(after, "deepinfer_engine_state", deployment=NAME, state="Running") == 1
    assert _one(after, "deepinfer_deployment_desired_replicas", deployment=NAME) == 1
    assert _one(after, "deepinfer_deployment_ready_replicas", deployment=NAME) == 1
    # the controller, the worker and the store client, through the process's store snapshot
    assert _one(after, "deepinfer_controller_leader") == 1
    assert _one(after, "deepinfer_controller_placements") >= 1
    name = "deepinfer_controller_reconcile_duration_seconds"
    assert _one(after, name, name + "_count") >= 1
    assert _one(after, "deepinfer_worker_launches", outcome="ready") == 1
    assert _one(after, "deepinfer_worker_lease_renewals") >= 1
    assert _one(after, "deepinfer_worker_engines") == 1
    assert _one(after, "deepinfer_store_errors") == 0


# ---- deploy/: the scrape config and the dashboard --------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (Debian package prometheus)")
    return path


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads((ROOT / "deploy/grafana/deepinfer.json").read_text())
    return dashboard


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_a_grafana_dashboard_and_its_queries_parse(tmp_path: Path) -> None:
    d = _dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["type"] in {"row", "timeseries", "stat"}, p["type"]
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert refs == ["ABCDEFGH"[i] for i in range(len(refs))], p["title"]
    # Every query through Prometheus' own parser: as recording rules, which promtool checks.
    # Grafana's variables become what they expand to.
    rules = [{"record": f"deepinfer:panel_{i}", "expr": expand(e)} for i, e in enumerate(_exprs(d))]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run(
        [_tool("promtool"), "check", "rules", str(rules_file)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    config = subprocess.run(
        [_tool("promtool"), "check", "config", str(ROOT / "deploy/prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert config.returncode == 0, config.stdout + config.stderr


def expand(expr: str) -> str:
    for var, value in (("$__rate_interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(var, value)
    return re.sub(r"\$\w+", ".*", expr)


async def test_dashboard_series_are_exported_and_prometheus_scrapes_them(
    services: ServiceSet, tmp_path: Path
) -> None:
    # tokens of its own, so that the scrape below has some whether or not a test ran before
    async with openai.AsyncOpenAI(
        base_url=_url(services) + "/v1", api_key="-", max_retries=0
    ) as client:
        await client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    async with httpx.AsyncClient(base_url=_url(services)) as http:
        deadline = time.monotonic() + 10
        while True:
            fams = await _polled(http)
            if any(s.value > 0 for s in fams["vllm:generation_tokens"]):
                break
            assert time.monotonic() < deadline, "the answer's tokens never reached /metrics"
            await asyncio.sleep(0.1)
        exported = set(fams)
    # No GPU here: the GPU series come from the same renderer over a sample like a GPU node's.
    gpu = GpuInfo(
        index=0,
        memory_total=1,
        memory_used=1,
        utilization=1.0,
        power_draw=1.0,
        temperature=1.0,
        processes=[GpuProcess(pid=1, used_memory=1)],
    )
    registry = CollectorRegistry()
    registry.register(_Families(list(gpu_families([GpuSamples(node="n", gpus=[gpu])]))))
    text = generate_latest(registry).decode()
    exported |= {f.name for f in text_string_to_metric_families(text)}
    named = {
        re.sub(r"_(bucket|count|sum|total)$", "", m)
        for e in _exprs(_dashboard())
        for m in re.findall(r"\b(?:vllm:|deepinfer_)[a-z_:]+", e)
    }
    assert named and named <= exported, sorted(named - exported)

    # A real Prometheus, with the shipped config pointed at this gateway, scrapes it once.
    assert services.gateway is not None
    config = (ROOT / "deploy/prometheus.yml").read_text()
    config = config.replace("127.0.0.1:8082", f"127.0.0.1:{services.gateway.port}")
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="prometheus-") as data:
        prom = await asyncio.create_subprocess_exec(
            _tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            series = await _prometheus_query(
                port, f'vllm:generation_tokens_total{{deployment="{NAME}"}}'
            )
        finally:
            prom.terminate()
            await asyncio.wait_for(prom.wait(), 30)
    assert series[0]["metric"]["job"] == "deepinfer"
    assert float(series[0]["value"][1]) > 0


async def _prometheus_query(port: int, query: str, timeout: float = 60.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        while True:
            try:
                answer = (await http.get("/api/v1/query", params={"query": query})).json()
                if answer["data"]["result"]:
                    result: list[Any] = answer["data"]["result"]
                    return result
            except (httpx.HTTPError, ValueError, KeyError):
                pass  # not up yet
            assert time.monotonic() < deadline, f"Prometheus never saw {query}"
            await asyncio.sleep(0.5)


class _Families:
    """A collector of fixed families."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return self._families
