"""Aggregation of the engine's own scheduler and iteration stats into `EngineStats`.

vLLM pushes a record per engine step (scheduler gauges, per-iteration token counts); this keeps
the latest gauges, running totals, and a short window for token rates. Pure and clock-injected
so it is tested without an engine; `vllm_backend` feeds it from a vLLM `StatLoggerBase`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from .backend import EngineStats

WINDOW_S = 5.0


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
            )

    def _trim(self, now: float) -> None:
        while self._window and self._window[0][0] < now - WINDOW_S:
            self._window.popleft()
