"""Aggregation of the engine's own scheduler and iteration stats into `EngineStats`.

vLLM pushes a record per engine step (scheduler gauges, per-iteration token counts, the step's
time-to-first-token and inter-token latencies); this keeps the latest gauges, running totals,
latency histograms (vLLM's own bucket bounds, so the gateway's `vllm:*` series read as vLLM's
server's do) and a short window for token rates. Pure and clock-injected so it is tested without
an engine; `vllm_backend` feeds it from a vLLM `StatLoggerBase`, llama.cpp's worker thread per
token.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable, Iterable

from .backend import EngineStats, Histogram

WINDOW_S = 5.0

# vllm/v1/metrics/buckets.py (vLLM 0.32): TIME_TO_FIRST_TOKEN_BUCKETS, INTER_TOKEN_LATENCY_BUCKETS
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip


class Buckets:
    """A histogram being filled (not thread-safe: its owner locks)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le, as Prometheus)
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> Histogram:
        return Histogram(bounds=self.bounds, counts=tuple(self._counts), sum=self._sum)


class StatsAccumulator:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._running = 0
        self._waiting = 0
        self._kv_usage = 0.0
        self._prompt_total = 0
        self._gen_total = 0
        self._finished_total = 0
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._window: collections.deque[tuple[float, int, int]] = collections.deque()
        self._ttft = Buckets(TTFT_BUCKETS)
        self._itl = Buckets(ITL_BUCKETS)

    def record_scheduler(
        self,
        *,
        running: int,
        waiting: int,
        kv_cache_usage: float,
        prefix_queries: int = 0,
        prefix_hits: int = 0,
    ) -> None:
        with self._lock:
            self._running, self._waiting, self._kv_usage = running, waiting, kv_cache_usage
            self._prefix_queries += prefix_queries
            self._prefix_hits += prefix_hits

    def record_iteration(
        self, *, prompt_tokens: int, generation_tokens: int, finished: int
    ) -> None:
        now = self._clock()
        with self._lock:
            self._prompt_total += prompt_tokens
            self._gen_total += generation_tokens
            self._finished_total += finished
            self._window.append((now, prompt_tokens, generation_tokens))
            self._trim(now)

    def record_latencies(
        self, *, first_token: Iterable[float] = (), inter_token: Iterable[float] = ()
    ) -> None:
        """Seconds to first token (one per request) and between tokens (one per token after the
        first), as the engine measured them."""
        with self._lock:
            for value in first_token:
                self._ttft.observe(value)
            for value in inter_token:
                self._itl.observe(value)

    def snapshot(self) -> EngineStats:
        now = self._clock()
        with self._lock:
            self._trim(now)
            prompt = sum(p for _, p, _ in self._window)
            gen = sum(g for _, _, g in self._window)
            hit_rate = self._prefix_hits / self._prefix_queries if self._prefix_queries else 0.0
            return EngineStats(
                running=self._running,
                waiting=self._waiting,
                kv_cache_usage=self._kv_usage,
                prompt_tokens_total=self._prompt_total,
                generation_tokens_total=self._gen_total,
                prompt_tokens_per_s=prompt / WINDOW_S,
                generation_tokens_per_s=gen / WINDOW_S,
                requests_finished_total=self._finished_total,
                prefix_cache_hit_rate=hit_rate,
                time_to_first_token=self._ttft.snapshot(),
                inter_token_latency=self._itl.snapshot(),
            )

    def _trim(self, now: float) -> None:
        while self._window and self._window[0][0] < now - WINDOW_S:
            self._window.popleft()
