"""Aggregation of engine stats: latest gauges, totals, and a windowed token rate."""

from __future__ import annotations

from deepinfer_nb.engine.stats import ITL_BUCKETS, TTFT_BUCKETS, WINDOW_S, StatsAccumulator


def test_gauges_totals_and_window() -> None:
    now = [100.0]
    acc = StatsAccumulator(clock=lambda: now[0])
    acc.record_scheduler(
        running=3, waiting=1, kv_cache_usage=0.25, prefix_queries=10, prefix_hits=4
    )
    acc.record_iteration(prompt_tokens=50, generation_tokens=10, finished=0)
    now[0] += 1
    acc.record_iteration(prompt_tokens=0, generation_tokens=15, finished=2)
    s = acc.snapshot()
    assert (s.running, s.waiting, s.kv_cache_usage) == (3, 1, 0.25)
    assert (s.prompt_tokens_total, s.generation_tokens_total, s.requests_finished_total) == (
        50,
        25,
        2,
    )
    assert s.generation_tokens_per_s == 25 / WINDOW_S
    assert s.prefix_cache_hit_rate == 0.4
    now[0] += WINDOW_S + 0.5  # both samples fall out of the window; totals stay
    acc.record_scheduler(running=0, waiting=0, kv_cache_usage=0.0)
    s = acc.snapshot()
    assert s.generation_tokens_per_s == 0 and s.generation_tokens_total == 25 and s.running == 0


def test_latency_histograms_count_per_bucket_in_vllms_bounds() -> None:
    acc = StatsAccumulator()
    acc.record_latencies(first_token=[0.005, 0.3], inter_token=[0.01, 0.02, 100.0])
    s = acc.snapshot()
    ttft, itl = s.time_to_first_token, s.inter_token_latency
    assert ttft.bounds == TTFT_BUCKETS and itl.bounds == ITL_BUCKETS
    # a value on a bound belongs to that bound's bucket (Prometheus' `le`)
    assert ttft.counts[TTFT_BUCKETS.index(0.005)] == 1
    assert ttft.counts[TTFT_BUCKETS.index(0.5)] == 1  # 0.3 lies in (0.25, 0.5]
    assert (sum(ttft.counts), ttft.sum) == (2, 0.305)
    assert itl.counts[0] == 1 and itl.counts[1] == 1 and itl.counts[-1] == 1  # above all bounds
    assert len(itl.counts) == len(ITL_BUCKETS) + 1
