"""GPU processes matched to engines: a fake NVML lists pids, REAL process trees own them.

A worker's engine is a shim whose child (vLLM's EngineCore, or its TP workers) holds the GPU
memory; NVML lists that child, never the shim. The worker names each GPU process after the
engine whose tree holds it; every other pid is shown as unknown, in the samples the monitor,
`cluster.gpus()` and `/v1/gpus` read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepinfer_nb import gpu
from deepinfer_nb.client import render
from deepinfer_nb.client.view import Snapshot
from deepinfer_nb.control.launcher import EngineProcess, LogTail
from deepinfer_nb.control.worker import Worker
from deepinfer_nb.models import Engine, EngineState, GpuSamples
from deepinfer_nb.store.memory import MemoryStore
from tests.unit.test_gpu import GIB, FakeNvml, full_device

# A stand-in shim: it starts a child (the "EngineCore") and prints the child's pid.
SHIM = (
    "import subprocess, sys, time\n"
    "core = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print(core.pid, flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture
def shim() -> Iterator[tuple[int, int]]:
    """(shim pid, its child's pid), a real process tree in its own session."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SHIM], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        yield proc.pid, child
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_process_owners_walk_the_whole_tree(shim: tuple[int, int]) -> None:
    parent, child = shim
    owners = gpu.process_owners({parent: ("e1", "d"), 2**22 + 7: ("gone", "d")})
    assert owners[parent] == owners[child] == ("e1", "d")
    assert os.getpid() not in owners  # not in any engine's tree
    assert ("gone", "d") not in owners.values()  # a root that no longer runs owns nothing


async def test_worker_samples_name_the_engine_and_the_unknown(
    shim: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent, child = shim
    stranger = os.getpid()  # a real process outside every engine tree
    nvml = FakeNvml(
        [
            full_device(
                procs=[
                    types.SimpleNamespace(pid=child, usedGpuMemory=6 * GIB),
                    types.SimpleNamespace(pid=stranger, usedGpuMemory=GIB),
                ]
            ),
            full_device(uuid="GPU-2", procs=[]),
        ]
    )
    monkeypatch.setattr(gpu, "_load_nvml", lambda: nvml)
    store = MemoryStore()
    worker = Worker(store, node_id="n1", home=tmp_path)
    engine = Engine(id="d-0-a", deployment="d", state=EngineState.RUNNING, node="n1", gpus=[0])
    worker._records[engine.id] = engine
    worker.launcher.processes[engine.id] = EngineProcess(
        engine_id=engine.id,
        pid=parent,
        start_time=time.time(),
        port=1,
        endpoint="127.0.0.1:1",
        log_path=tmp_path / "log",
        tail=LogTail(tmp_path / "log"),
    )
    devices, reason = worker._probe()
    assert reason == ""
    first = devices[0].processes
    assert [(p.pid, p.engine, p.deployment) for p in first] == [
        (child, "d-0-a", "d"),
        (stranger, "", ""),
    ]
    samples = GpuSamples(node="n1", gpus=devices)
    snap = Snapshot(
        deployments={}, engines={engine.id: engine}, nodes={}, gpus={"n1": samples}, revision=1
    )
    rows = render.gpu_rows(snap)
    assert rows[0]["processes"] == f"d-0-a 6.00 GiB, unknown pid {stranger} 1.00 GiB"
    assert (rows[0]["booked"], rows[1]["processes"], rows[1]["booked"]) == ("d-0-a", "", "")
    await store.close()
