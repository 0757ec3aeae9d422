"""Prometheus metrics of one gateway, on its own `CollectorRegistry` (several gateways, e.g. in
tests or a notebook, never collide in the process-global registry).

Per model: requests by endpoint and status, errors by type, latency, time to first token, prompt
and completion tokens. Per engine: requests in flight. Cluster: engines per state (kept current
by the routing table, which calls the `TableObserver` methods). A metric's children are looked
up once per label values and kept: prometheus_client's `labels()` validates and locks on every
call, and a request touches six of them. The cluster's figures (engines, deployments, GPUs,
controllers, workers) join the same registry from `cluster_metrics.py`, and the requests
waiting for a replica from `hold.py`.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

M = TypeVar("M", Counter, Gauge, Histogram)


class _Children(Generic[M]):
    """`metric.labels(*values)`, looked up once per label values."""

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = _Children(
            Counter(
                "deepinfer_gateway_requests",
                "Requests answered",
                ["model", "endpoint", "status"],
                registry=r,
            )
        )
        self.errors = _Children(
            Counter(
                "deepinfer_gateway_errors",
                "Requests answered with an error",
                ["model", "endpoint", "type"],
                registry=r,
            )
        )
        self.latency = _Children(
            Histogram(
                "deepinfer_gateway_request_duration_seconds",
                "Time from request to the last byte",
                ["model", "endpoint"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.ttft = _Children(
            Histogram(
                "deepinfer_gateway_time_to_first_token_seconds",
                "Time from request to the first generated token",
                ["model"],
                buckets=_TTFT_BUCKETS,
                registry=r,
            )
        )
        self.prompt_tokens = _Children(
            Counter("deepinfer_gateway_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        )
        self.completion_tokens = _Children(
            Counter(
                "deepinfer_gateway_completion_tokens", "Generated tokens", ["model"], registry=r
            )
        )
        self.inflight = _Children(
            Gauge(
                "deepinfer_gateway_engine_inflight_requests",
                "Requests outstanding per engine",
                ["engine", "deployment"],
                registry=r,
            )
        )
        self.engines = _Children(
            Gauge("deepinfer_gateway_engines", "Engines per state", ["state"], registry=r)
        )

    # ---- per request ----------------------------------------------------------------------------

    def finished(
        self, *, model: str, endpoint: str, status: int, seconds: float, error_type: str = ""
    ) -> None:
        self.requests(model, endpoint, str(status)).inc()
        self.latency(model, endpoint).observe(seconds)
        if error_type:
            self.errors(model, endpoint, error_type).inc()

    def first_token(self, *, model: str, seconds: float) -> None:
        self.ttft(model).observe(seconds)

    def tokens(self, *, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens(model).inc(prompt)
        self.completion_tokens(model).inc(completion)

    # ---- routing.TableObserver ------------------------------------------------------------------

    def inflight_changed(self, engine_id: str, deployment: str, value: int) -> None:
        self.inflight(engine_id, deployment).set(value)

    def states_changed(self, counts: dict[str, int]) -> None:
        for state, n in counts.items():
            self.engines(state).set(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
