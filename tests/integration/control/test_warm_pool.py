"""The worker's warm pool for real (the Python API's in-kernel services, memory store, real vLLM
on CPU), one chain that keeps at most two vLLM process trees alive (the pool member and the
engine):

1. the worker reports a warm member (pid, memory) in its node's samples;
2. a deployment takes that very process (the engine's pid is the member's) and is Running soon
   after the write, answering "Paris";
3. the pool refills with a new member once the engine is Running;
4. the engine SIGKILLed -> Failed -> restarted from the refilled member (its pid again).

Measured times are printed (run with -s to see them).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import psutil
import pytest

import deepinfer_nb
from deepinfer_nb.client.cluster import Cluster
from deepinfer_nb.config import Settings, home_dir
from deepinfer_nb.engine import local_models
from deepinfer_nb.engine.process import process_tree
from deepinfer_nb.models import Engine, EngineState, WarmPoolStatus
from deepinfer_nb.testing import FAST_SCHEDULER

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

T = TypeVar("T")
NODE = "warm"
PARIS = "What is the capital of France? Answer in one word."
WARM_S = 300.0  # a member's imports on two busy cores, with margin
FAST_RUNNING_S = 20.0
"""Write to Running from a warm member: about 5 s on two idle cores (a cold start: 27-48 s)."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    local_models.build(local_models.CATALOG["smollm2-135m-instruct"])
    settings = Settings()
    settings.scheduler = FAST_SCHEDULER
    settings.agent.warm_pool = 1
    settings.agent.gpu_sample_interval_s = 0.5
    settings.agent.health_check_interval_s = 0.5
    settings.agent.stop_grace_s = 5.0
    c = deepinfer_nb.connect(
        "memory://", worker=True, gateway_port=None, node_id=NODE, settings=settings
    )
    try:
        yield c
    finally:
        c.shutdown(timeout=120)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.2)


def warm_member(cluster: Cluster, *, other_than: int = 0) -> WarmPoolStatus | None:
    samples = cluster.snapshot().gpus.get(NODE)
    pool = samples.warm_pool if samples is not None else None
    if pool is None or pool.warm < 1 or other_than in pool.pids:
        return None
    return pool


def running_engine(cluster: Cluster, *, restarts: int = 0) -> Engine | None:
    for e in cluster.snapshot().engines_of("pooled"):
        if e.state == EngineState.RUNNING and e.restarts >= restarts:
            return e
    return None


def test_deploy_takes_the_warm_process_refills_and_restarts_from_it(cluster: Cluster) -> None:
    pool = wait_for("a warm pool member", lambda: warm_member(cluster), WARM_S)
    assert pool.size == 1 and len(pool.pids) == 1
    assert pool.memory_bytes > 200 << 20  # torch and vLLM imported, in two processes
    member = pool.pids[0]

    written = time.monotonic()
    dep = cluster.deploy(
        "smollm2-135m-instruct", name="pooled", device="cpu", enforce_eager=True, max_model_len=2048
    )
    engine = wait_for("Running", lambda: running_engine(cluster), WARM_S)
    to_running = time.monotonic() - written
    answer = dep.chat(PARIS, max_tokens=8, temperature=0)
    print(f"\nwarm pool: write -> Running {to_running:.1f}s")
    assert engine.pid == member, "the deployment did not take the warm process"
    assert "Paris" in answer.text
    assert to_running < FAST_RUNNING_S
    assert_bound_as_logged(engine)

    refill = wait_for("a new warm member", lambda: warm_member(cluster, other_than=member), WARM_S)
    (second,) = refill.pids
    assert second != member

    killed = time.monotonic()
    os.kill(engine.pid, signal.SIGKILL)
    again = wait_for("Running again", lambda: running_engine(cluster, restarts=1), WARM_S)
    back = time.monotonic() - killed
    print(f"warm pool: SIGKILL -> Running again {back:.1f}s")
    assert again.pid == second, "the restart did not take the warm process"
    assert not psutil.pid_exists(member) or psutil.Process(member).status() == "zombie"
    assert "Paris" in dep.chat(PARIS, max_tokens=8, temperature=0).text
    assert back < FAST_RUNNING_S + 5


def assert_bound_as_logged(engine: Engine) -> None:
    """vLLM's worker, a fork of the warm server, runs on the cores vLLM's log says it binds
    (OpenMP settings that a spawned worker would have read at start, applied after the fork)."""
    text = (home_dir() / "logs" / f"{engine.id}.log").read_text(errors="replace")
    logged = re.findall(r"local_rank=0, core ids=\[([\d, ]+)\]", text)
    assert logged, "vLLM logged no OpenMP binding"
    cores = {int(c) for c in logged[-1].split(",")}
    affinities = [set(p.cpu_affinity() or []) for p in process_tree(engine.pid)]
    assert cores in affinities, f"no process bound to {cores}: {affinities}"
