"""The cluster's figures at the gateway's `/metrics`: engines, deployments, GPUs, controllers,
workers and store clients, beside the gateway's own counters (metrics.py).

`ClusterMetrics` polls in the background, every `[server] metrics_interval_s`: each Running
engine's `GetMetrics` over the routing table's pooled channel, and the store's process snapshots
(`metrics/{process}`, written by `control/metrics.py` in every process that runs a controller,
worker or gateway) and GPU samples (`nodes/{id}/gpus`). A scrape renders the last poll as a
prometheus_client custom collector: it never calls an engine or the store, and a request never
waits for either.

Series, with vLLM's own names where the meaning is the same (its dashboards work unchanged) and
labels `deployment, engine, node, model_name`:

    vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc (0..1)
    vllm:prompt_tokens_total, vllm:generation_tokens_total
    vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds   (histograms)
    deepinfer_engine_requests_finished_total, deepinfer_engine_up (its last poll answered),
    deepinfer_engine_state{state} (1 for the engine's state, 0 for the others; every engine)
    deepinfer_deployment_desired_replicas, deepinfer_deployment_ready_replicas {deployment}
    deepinfer_gpu_{utilization_percent, memory_used_bytes, memory_total_bytes, power_watts,
      temperature_celsius} {node, gpu, uuid, name}
    deepinfer_gpu_process_memory_bytes {node, gpu, pid, engine, deployment} (engine "" = unknown)
    deepinfer_controller_* {process, identity}, deepinfer_worker_* {process, node},
    deepinfer_store_{retries,errors}_total {process}
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..errors import DeepInferError, StoreError
from ..models import (
    DeploymentSpec,
    Engine,
    EngineState,
    GpuSamples,
    HistogramData,
    ProcessMetrics,
)
from ..procenv import stop_task
from ..store import MetaStore, decode_record, keys
from .routing import RoutingTable

log = logging.getLogger(__name__)

ENGINE_LABELS = ["deployment", "engine", "node", "model_name"]
GPU_LABELS = ["node", "gpu", "uuid", "name"]


@dataclasses.dataclass(frozen=True)
class EnginePoll:
    """One engine's last `GetMetrics` answer (None: the poll failed)."""

    engine: Engine
    model_name: str
    metrics: Any = None  # engine_service_pb2.MetricsResponse


class ClusterMetrics:
    """The background poll (`start`/`close`) and the collector (`collect`) over its results."""

    def __init__(self, table: RoutingTable, store: MetaStore, *, interval_s: float) -> None:
        self._table = table
        self._store = store
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.engines: dict[str, EnginePoll] = {}
        self.processes: list[ProcessMetrics] = []
        self.gpus: list[GpuSamples] = []

    # ---- polling -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="deepinfer-metrics-poll")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # a broken poll must not end the polling; the next one may work
                log.warning("metrics poll failed", exc_info=True)
            await asyncio.sleep(self._interval_s)

    async def poll_once(self) -> None:
        """Ask every Running engine for its metrics and read the store's snapshots, at once."""
        targets = self._table.running_clients()
        polls = await asyncio.gather(*(self._poll(e, c) for e, c in targets))
        self.engines = {p.engine.id: p for p in polls}
        try:
            processes, gpus = await asyncio.wait_for(
                asyncio.gather(self._store.range(keys.METRICS), self._store.range(keys.NODES)),
                self._timeout_s,
            )
        except (StoreError, asyncio.TimeoutError) as exc:  # the last figures stand meanwhile
            log.debug("metrics poll: store not read: %s", exc)
            return
        self.processes = [
            p
            for kv in processes.items
            if (p := decode_record(ProcessMetrics, kv.key, kv.value)) is not None
        ]
        self.gpus = [
            s
            for kv in gpus.items
            if keys.is_node_gpus(kv.key)
            and (s := decode_record(GpuSamples, kv.key, kv.value)) is not None
        ]

    @property
    def _timeout_s(self) -> float:
        return max(1.0, min(self._interval_s, 5.0))

    async def _poll(self, engine: Engine, client: Any) -> EnginePoll:
        spec = self._table.deployments.get(engine.deployment)
        model_name = spec.model_name if spec is not None else engine.deployment
        try:
            answer = await asyncio.wait_for(client.metrics(), self._timeout_s)
        except (DeepInferError, asyncio.TimeoutError) as exc:
            log.debug("metrics poll: engine %s did not answer: %s", engine.id, exc)
            answer = None
        return EnginePoll(engine, model_name, answer)

    # ---- prometheus_client collector -----------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []  # the families depend on the cluster: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        yield from engine_families(self.engines.values(), self._table.engines.values())
        yield from deployment_families(self._table.deployments, self._table.engines.values())
        yield from gpu_families(self.gpus)
        yield from process_families(self.processes)


# ---- rendering (pure) ----------------------------------------------------------------------------


def engine_families(polls: Iterable[EnginePoll], engines: Iterable[Engine]) -> Iterator[Metric]:
    polls = list(polls)

    def family(cls: Any, name: str, doc: str) -> Any:
        return cls(name, doc, labels=ENGINE_LABELS)

    running = family(GaugeMetricFamily, "vllm:num_requests_running", "Requests running")
    waiting = family(GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting")
    kv = family(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 %")
    prompt = family(CounterMetricFamily, "vllm:prompt_tokens", "Prefill tokens processed")
    gen = family(CounterMetricFamily, "vllm:generation_tokens", "Generation tokens processed")
    finished = family(
        CounterMetricFamily, "deepinfer_engine_requests_finished", "Requests the engine finished"
    )
    ttft = family(HistogramMetricFamily, "vllm:time_to_first_token_seconds", "Time to first token")
    itl = family(HistogramMetricFamily, "vllm:inter_token_latency_seconds", "Time between tokens")
    up = family(GaugeMetricFamily, "deepinfer_engine_up", "1 if the last metrics poll answered")
    for p in polls:
        labels = [p.engine.deployment, p.engine.id, p.engine.node, p.model_name]
        up.add_metric(labels, 1.0 if p.metrics is not None else 0.0)
        m = p.metrics
        if m is None:
            continue
        running.add_metric(labels, m.running_requests)
        waiting.add_metric(labels, m.waiting_requests)
        kv.add_metric(labels, m.kv_cache_usage)
        prompt.add_metric(labels, m.prompt_tokens_total)
        gen.add_metric(labels, m.generation_tokens_total)
        finished.add_metric(labels, m.requests_finished_total)
        for fam, h in ((ttft, m.time_to_first_token_s), (itl, m.inter_token_latency_s)):
            if h.bounds:
                fam.add_metric(labels, *_buckets(list(h.bounds), list(h.counts), h.sum))
    state = GaugeMetricFamily(
        "deepinfer_engine_state",
        "1 for the engine's current state, 0 for the others",
        labels=["deployment", "engine", "node", "state"],
    )
    for e in engines:
        for s in EngineState:
            state.add_metric([e.deployment, e.id, e.node, s.value], 1.0 if e.state is s else 0.0)
    yield from (running, waiting, kv, prompt, gen, finished, ttft, itl, up, state)


def deployment_families(
    deployments: dict[str, DeploymentSpec], engines: Iterable[Engine]
) -> Iterator[Metric]:
    ready: dict[str, int] = dict.fromkeys(deployments, 0)
    for e in engines:
        if e.state is EngineState.RUNNING and e.deployment in ready:
            ready[e.deployment] += 1
    desired = GaugeMetricFamily(
        "deepinfer_deployment_desired_replicas", "Replicas asked for", labels=["deployment"]
    )
    running = GaugeMetricFamily(
        "deepinfer_deployment_ready_replicas", "Replicas Running", labels=["deployment"]
    )
    for name, spec in sorted(deployments.items()):
        desired.add_metric([name], spec.replicas)
        running.add_metric([name], ready[name])
    yield from (desired, running)


def gpu_families(samples: Iterable[GpuSamples]) -> Iterator[Metric]:
    fields = (
        ("utilization", "deepinfer_gpu_utilization_percent", "GPU utilisation, percent"),
        ("memory_used", "deepinfer_gpu_memory_used_bytes", "GPU memory in use"),
        ("memory_total", "deepinfer_gpu_memory_total_bytes", "GPU memory"),
        ("power_draw", "deepinfer_gpu_power_watts", "GPU power draw"),
        ("temperature", "deepinfer_gpu_temperature_celsius", "GPU temperature"),
    )
    families = {f: GaugeMetricFamily(name, doc, labels=GPU_LABELS) for f, name, doc in fields}
    procs = GaugeMetricFamily(
        "deepinfer_gpu_process_memory_bytes",
        "GPU memory per process; engine is empty for a process of no engine of its node",
        labels=["node", "gpu", "pid", "engine", "deployment"],
    )
    for sample in samples:
        for g in sample.gpus:
            labels = [sample.node, str(g.index), g.uuid, g.name]
            for field, family in families.items():
                value = getattr(g, field)
                if value is not None:  # a field NVML cannot read has no series
                    family.add_metric(labels, float(value))
            for p in g.processes:
                if p.used_memory is not None:
                    where = [sample.node, str(g.index), str(p.pid), p.engine, p.deployment]
                    procs.add_metric(where, float(p.used_memory))
    yield from (*families.values(), procs)


def process_families(processes: Iterable[ProcessMetrics]) -> Iterator[Metric]:
    processes = list(processes)
    yield from _controller_families(processes)
    yield from _worker_families(processes)
    retries = CounterMetricFamily(
        "deepinfer_store_retries",
        "Store calls retried after a temporary failure",
        labels=["process"],
    )
    errors = CounterMetricFamily(
        "deepinfer_store_errors", "Store calls that failed after their retries", labels=["process"]
    )
    for p in processes:
        retries.add_metric([p.process], p.store.retries)
        errors.add_metric([p.process], p.store.failures)
    yield from (retries, errors)


def _controller_families(processes: list[ProcessMetrics]) -> Iterator[Metric]:
    labels = ["process", "identity"]
    leader = GaugeMetricFamily(
        "deepinfer_controller_leader", "1 while this controller leads", labels=labels
    )
    duration = HistogramMetricFamily(
        "deepinfer_controller_reconcile_duration_seconds", "Reconcile round time", labels=labels
    )
    placements = CounterMetricFamily(
        "deepinfer_controller_placements", "Engines placed on a node", labels=labels
    )
    restarts = CounterMetricFamily(
        "deepinfer_controller_restarts", "Failed engines placed again", labels=labels
    )
    conflicts = CounterMetricFamily(
        "deepinfer_controller_conflicts", "Writes that lost a compare-and-swap", labels=labels
    )
    actions = CounterMetricFamily(
        "deepinfer_controller_actions", "Actions applied, by kind", labels=[*labels, "action"]
    )
    for p in processes:
        c = p.controller
        if c is None:
            continue
        who = [p.process, c.identity]
        leader.add_metric(who, 1.0 if c.leader else 0.0)
        duration.add_metric(who, *_histogram(c.reconcile_seconds))
        placements.add_metric(who, c.placements)
        restarts.add_metric(who, c.restarts)
        conflicts.add_metric(who, c.conflicts)
        for verb, n in sorted(c.actions.items()):
            actions.add_metric([*who, verb], n)
    yield from (leader, duration, placements, restarts, conflicts, actions)


def _worker_families(processes: list[ProcessMetrics]) -> Iterator[Metric]:
    labels = ["process", "node"]
    renewals = CounterMetricFamily(
        "deepinfer_worker_lease_renewals", "Node lease keepalives that succeeded", labels=labels
    )
    renewal_failures = CounterMetricFamily(
        "deepinfer_worker_lease_renewal_failures",
        "Node lease keepalives that failed",
        labels=labels,
    )
    losses = CounterMetricFamily(
        "deepinfer_worker_lease_losses",
        "Node leases lost (the node registered again)",
        labels=labels,
    )
    launches = CounterMetricFamily(
        "deepinfer_worker_launches",
        "Engine launches by outcome (spawned, ready, failed before ready)",
        labels=[*labels, "outcome"],
    )
    engines = GaugeMetricFamily(
        "deepinfer_worker_engines", "Engine processes the worker holds", labels=labels
    )
    for p in processes:
        w = p.worker
        if w is None:
            continue
        who = [p.process, w.node]
        renewals.add_metric(who, w.lease_renewals)
        renewal_failures.add_metric(who, w.lease_renewal_failures)
        losses.add_metric(who, w.lease_losses)
        engines.add_metric(who, w.engines)
        for outcome in ("spawned", "ready", "failed"):  # every outcome, 0 included
            launches.add_metric([*who, outcome], w.launches.get(outcome, 0))
    yield from (renewals, renewal_failures, losses, launches, engines)


def _histogram(h: HistogramData) -> tuple[list[tuple[str, float]], float]:
    return _buckets(h.bounds, h.counts, h.sum)


def _buckets(
    bounds: list[float], counts: list[int], total: float
) -> tuple[list[tuple[str, float]], float]:
    """Per-bucket counts as Prometheus' cumulative `le` buckets (+Inf last), and the sum."""
    cumulative: list[tuple[str, float]] = []
    seen = 0
    for bound, n in zip([*bounds, float("inf")], counts, strict=True):
        seen += n
        cumulative.append(("+Inf" if bound == float("inf") else _le(bound), float(seen)))
    return cumulative, total


def _le(bound: float) -> str:
    return repr(float(bound))
