"""What deepinfer-nb sees on a GPU host: the NVML probe idle and under load, the node's live GPU
samples in the cluster and at the gateway, and where a one-GPU deployment is placed.

Run it on a machine with an NVIDIA GPU and PyTorch for CUDA (it loads the GPU with PyTorch):

    python benchmarks/gpu_host.py [--load-gib 16] [--load-s 20]

Steps: an in-process cluster (memory:// store, this kernel's worker, the gateway on a free
port); the probe's figures with the GPU idle; then a child process holds --load-gib of GPU memory
and multiplies bf16 matrices, and the probe, the worker's samples (`nodes/{id}/gpus`, what the
widgets and `cluster.gpus()` show) and `GET /v1/gpus` must show that memory and the utilisation
(and whether NVML lists the child's pid, which it cannot in some containers). The load runs
as the grandchild of a stand-in shim, as vLLM's EngineCore does under the engine shim: the GPU
process join (`gpu.process_owners` + `gpu.join_processes`) must name the stand-in engine for that
pid, and `cluster.gpus()` (the worker's own join, which knows no such engine) must show it as
`unknown pid N`. Last, `deploy(gpus=1)` must be placed on GPU 0 of this node. The engine then
starts as on any host: without vLLM for CUDA installed it fails, and the script prints the
engine's error as the user would see it; with it, the engine Runs and the worker's samples must
name the engine for its EngineCore's GPU memory. Prints a table and writes
benchmarks/results/gpu_host.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepinfer_nb import gpu  # noqa: E402
from deepinfer_nb.client import cluster as api  # noqa: E402
from deepinfer_nb.models import EngineState, GpuInfo  # noqa: E402

GIB = 1024**3
LOAD = """
import os, sys, time, torch
hold = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda")
a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
print(os.getpid(), flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
"""


# A stand-in engine shim: runs LOAD as its child (as the shim runs vLLM's EngineCore) and passes
# the child's first line (its pid) on.
SHIM = """
import subprocess, sys
core = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], stdout=subprocess.PIPE,
                        text=True)
print(core.stdout.readline().strip(), flush=True)
sys.exit(core.wait())
"""


def row(d: GpuInfo) -> dict[str, Any]:
    return {
        "name": d.name,
        "memory_used_gib": None if d.memory_used is None else round(d.memory_used / GIB, 2),
        "memory_total_gib": round(d.memory_total / GIB, 2),
        "utilization_pct": d.utilization,
        "temperature_c": d.temperature,
        "power_w": d.power_draw,
        "processes": [(p.pid, round((p.used_memory or 0) / GIB, 2)) for p in d.processes],
    }


def probe_timed() -> tuple[list[GpuInfo], str, float]:
    start = time.perf_counter()
    devices, reason = gpu.probe()
    return devices, reason, (time.perf_counter() - start) * 1e3


def wait_for(what: str, check: Any, timeout: float, detail: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    why = f" ({detail()})" if detail is not None else ""
    raise SystemExit(f"FAILED: {what} not seen within {timeout:.0f} s{why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load-gib", type=float, default=16.0)
    parser.add_argument("--load-s", type=float, default=20.0)
    args = parser.parse_args()
    out: dict[str, Any] = {}

    devices, reason, ms = probe_timed()
    if not devices:
        raise SystemExit(f"no GPU here: {reason}")
    idle = devices[0]
    out["idle"] = row(idle) | {"probe_ms": round(ms, 1)}
    print("idle:", out["idle"], flush=True)

    cluster = api.connect("memory://", gateway_port=0, node_id="gpu-host")
    try:
        node = wait_for("the node", lambda: cluster.snapshot().nodes.get("gpu-host"), 30)
        out["node_gpus"] = [(g.index, g.name, round(g.memory_total / GIB, 1)) for g in node.gpus]
        print("node:", out["node_gpus"], node.gpu_error or "", flush=True)

        load = subprocess.Popen(
            [sys.executable, "-c", SHIM, LOAD, str(args.load_gib), str(args.load_s)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert load.stdout is not None
        load_pid = int(load.stdout.readline())
        time.sleep(3)
        devices, _, ms = probe_timed()
        busy = devices[0]
        listed = any(p.pid == load_pid for p in busy.processes)
        out["under_load"] = row(busy) | {"probe_ms": round(ms, 1), "load_pid_listed": listed}
        print("under load:", out["under_load"], flush=True)
        # the join: the stand-in shim's tree owns the CUDA process NVML lists
        owners = gpu.process_owners({load.pid: ("bench-engine", "bench")})
        joined = gpu.join_processes([busy], owners)[0]
        named = [(p.pid, p.engine or "unknown") for p in joined.processes]
        out["join"] = {"shim_pid": load.pid, "cuda_pid": load_pid, "processes": named}
        print("join:", out["join"], flush=True)
        if listed and (load_pid, "bench-engine") not in named:
            raise SystemExit("FAILED: the join did not name the engine of the CUDA process")

        held_min = args.load_gib * GIB * 0.9

        def sampled() -> GpuInfo | None:
            samples = cluster.snapshot().gpus.get("gpu-host")
            if samples is None or not samples.gpus:
                return None
            g = samples.gpus[0]
            held = (g.memory_used or 0) - (idle.memory_used or 0)
            return g if held >= held_min and (g.utilization or 0) > 0 else None

        seen = wait_for("the load in the worker's samples", sampled, 15)
        out["worker_sample"] = row(seen)
        print("worker sample:", out["worker_sample"], flush=True)
        frame = cluster.gpus()
        out["cluster_gpus_processes"] = frame["processes"].tolist()
        print("cluster.gpus() processes:", out["cluster_gpus_processes"], flush=True)
        if listed and f"unknown pid {load_pid}" not in str(out["cluster_gpus_processes"]):
            raise SystemExit("FAILED: cluster.gpus() does not show the load as unknown")
        with httpx.Client(base_url=cluster.gateway_url or "", timeout=10) as http:
            body = http.get("/v1/gpus").raise_for_status().json()
        out["gateway_v1_gpus"] = body
        print("GET /v1/gpus:", json.dumps(body)[:600], flush=True)
        if body["data"][0]["gpus"][0]["memory_used"] < (idle.memory_used or 0) + held_min:
            raise SystemExit("FAILED: GET /v1/gpus does not show the load's memory")
        load.wait(timeout=args.load_s + 30)

        dep = cluster.deploy("smollm2-135m-instruct", name="gpu-check", gpus=1)

        def placed() -> Any:
            engines = [e for e in dep.engines if e.node and e.gpus]
            return engines[0] if engines else None

        engine = wait_for("the placement", placed, 30, lambda: dep.status)
        out["placement"] = {"node": engine.node, "device": engine.device, "gpus": engine.gpus}
        print("placed:", out["placement"], flush=True)

        def settled() -> Any:
            e = next(iter(dep.engines), None)
            done = e is not None and (e.state is EngineState.RUNNING or e.error)
            return e if done else None

        engine = wait_for("the engine to run or fail", settled, 240)
        out["engine"] = {"state": engine.state.value, "error": engine.error[-800:]}
        print("engine:", engine.state.value, engine.error[-800:], flush=True)
        if engine.state is EngineState.RUNNING:

            def named_engine() -> Any:
                samples = cluster.snapshot().gpus.get("gpu-host")
                procs = [p for g in (samples.gpus if samples else []) for p in g.processes]
                return [p for p in procs if p.engine == engine.id] or None

            held = wait_for("the engine named in the GPU samples", named_engine, 30)
            out["engine_gpu_processes"] = [(p.pid, p.used_memory) for p in held]
            print("engine's GPU processes:", out["engine_gpu_processes"], flush=True)
        dep.stop()
    finally:
        cluster.shutdown()

    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu_host.json").write_text(json.dumps(out, indent=2, default=str))
    print()
    print("| | memory used GiB | util % | power W | processes (pid, GiB) | probe ms |")
    print("|---|---|---|---|---|---|")
    for label in ("idle", "under_load", "worker_sample"):
        r = out[label]
        print(
            f"| {label} | {r['memory_used_gib']} | {r['utilization_pct']} | {r['power_w']} "
            f"| {r['processes']} | {r.get('probe_ms', '')} |"
        )


if __name__ == "__main__":
    main()
