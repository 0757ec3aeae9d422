"""The shim's stat logger inside vLLM's own `StatLoggerManager` (the class AsyncLLM builds).

It must be the only logger there besides vLLM's log lines: vLLM's Prometheus logger, which the
shim never serves, would otherwise be added and updated on every engine step.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerManager
from vllm.v1.metrics.stats import IterationStats, SchedulerStats

from deepinfer_nb.engine.stats import StatsAccumulator
from deepinfer_nb.engine.vllm_backend import _stat_logger_class


def test_replaces_vllms_prometheus_logger_and_feeds_the_accumulator() -> None:
    stats = StatsAccumulator()
    config: Any = object()  # the shim's logger ignores the config; no model needs loading
    manager = StatLoggerManager(
        vllm_config=config,
        custom_stat_loggers=[_stat_logger_class(stats)],
        enable_default_loggers=False,
    )
    (only,) = manager.stat_loggers
    assert isinstance(only, PrometheusStatLogger)  # what keeps vLLM from adding its own
    assert not hasattr(only, "gauge_scheduler_running")  # and none of its metrics were built
    manager.record(
        scheduler_stats=SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.5),
        iteration_stats=None,
    )
    manager.log_engine_initialized()
    manager.record_sleep_state(1, 0)
    snap = stats.snapshot()
    assert (snap.running, snap.waiting, snap.kv_cache_usage) == (3, 2, 0.5)


def test_latencies_of_each_step_reach_the_histograms() -> None:
    stats = StatsAccumulator()
    logger = _stat_logger_class(stats)(object())
    step = IterationStats()
    step.num_generation_tokens = 3
    step.time_to_first_tokens_iter = [0.07]
    step.inter_token_latencies_iter = [0.02, 0.03]
    logger.record(scheduler_stats=None, iteration_stats=step)
    snap = stats.snapshot()
    assert sum(snap.time_to_first_token.counts) == 1 and snap.time_to_first_token.sum == 0.07
    assert sum(snap.inter_token_latency.counts) == 2 and snap.generation_tokens_total == 3
