"""Control-plane benchmarks. Prints a table per section; merges into
benchmarks/results/control_plane.json (each section replaces only its own key).

Sections (`--section NAME`, repeatable; default: all registered):

- `placement`: controller throughput placing 1,000 replicas (100 deployments x 10) over 100
  simulated nodes (8 x 80 GiB GPUs each, registered under leases like real workers), from the
  deployment writes until every engine record is Scheduled. Measured for the pure decision
  (`reconcile.decide`, no I/O, per strategy), the real controller loop on `memory://`, and the
  real controller loop on a real etcd (started here from the `etcd` binary, or `--etcd-url`).

- `deploy`: deploy write -> Pending -> Scheduled -> claimed (Starting) -> launched -> Running,
  with the in-process controller and a real worker starting the real SmolLM2 engine on CPU; the
  engine's own load time (launch to first READY, polled every 20 ms) is reported
  separately, and the control plane's share is the rest.

A section is a coroutine in `SECTIONS`: it receives the parsed args and returns its JSON-able
result plus table lines.

    .venv/bin/python benchmarks/control_plane.py [--section placement] [--no-etcd]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from deepinfer_nb.config import SchedulerSettings
from deepinfer_nb.control import reconcile
from deepinfer_nb.control.controller import APPLY_CONCURRENCY, Controller, read_snapshot
from deepinfer_nb.control.scheduler import STRATEGIES
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState, GpuInfo, Node, Placement
from deepinfer_nb.store import Lease, Put, keys, open_store
from deepinfer_nb.store.local_etcd import LocalEtcd

RESULTS = Path(__file__).parent / "results" / "control_plane.json"
GIB = 1024**3
NODES = 100
GPUS_PER_NODE = 8
DEPLOYMENTS = 100
REPLICAS = 10
FRACTION = 0.45  # two engines per GPU: 1,000 replicas fill 500 of the 800 GPUs' halves

Section = Callable[[argparse.Namespace], Awaitable[tuple[dict[str, Any], list[str]]]]


def sim_node(i: int) -> Node:
    gpus = [
        GpuInfo(
            index=g,
            uuid=f"GPU-{i}-{g}",
            name="sim",
            memory_total=80 * GIB,
            memory_used=0,
            memory_free=80 * GIB,
        )
        for g in range(GPUS_PER_NODE)
    ]
    return Node(id=f"node-{i:03d}", host=f"sim-{i}", cpu_count=32, gpus=gpus)


def sim_specs(strategy: str = "spread") -> list[DeploymentSpec]:
    return [
        DeploymentSpec(
            name=f"dep-{i:03d}",
            model="sim",
            replicas=REPLICAS,
            gpu_memory_utilization=FRACTION,
            placement=Placement(strategy=strategy),
            created_at=float(i),
        )  # type: ignore[arg-type]
        for i in range(DEPLOYMENTS)
    ]


def pure_decide(strategy: str) -> dict[str, Any]:
    """Two decisions, as the controller makes them: create 1,000 records, then place them."""
    nodes = {n.id: n for n in (sim_node(i) for i in range(NODES))}
    specs = {s.name: s for s in sim_specs(strategy)}
    t0 = time.perf_counter()
    created = reconcile.decide(deployments=specs, engines=[], nodes=nodes, now=time.time())
    t1 = time.perf_counter()
    pending = [a.engine for a in created.actions]
    placed = reconcile.decide(deployments=specs, engines=pending, nodes=nodes, now=time.time())
    t2 = time.perf_counter()
    scheduled = [a for a in placed.actions if isinstance(a, reconcile.ScheduleEngine)]
    if len(scheduled) != DEPLOYMENTS * REPLICAS:
        raise RuntimeError(f"{strategy}: only {len(scheduled)} replicas placed")
    used = {(a.engine.node, g) for a in scheduled for g in a.engine.gpus}
    return {
        "create_s": round(t1 - t0, 4),
        "place_s": round(t2 - t1, 4),
        "replicas_per_s": round(len(scheduled) / (t2 - t1)),
        "gpus_used": len(used),
        "nodes_used": len({a.engine.node for a in scheduled}),
    }


async def controller_run(url: str) -> dict[str, Any]:
    store = open_store(url)
    leases: list[Lease] = []
    controller: Controller | None = None
    task: asyncio.Task[None] | None = None
    try:
        await store.delete_prefix(keys.ROOT)
        for i in range(NODES):
            lease = await store.grant_lease(30)
            leases.append(lease)
            await store.put(keys.node(sim_node(i).id), sim_node(i).encode(), lease=lease.id)
        settings = SchedulerSettings(reconcile_interval_s=2.0, leader_ttl_s=10)
        controller = Controller(store, settings=settings, identity="bench")
        task = asyncio.create_task(controller.run())
        await controller.wait_leading(10)
        start_rev = (await store.range(keys.LEADER)).revision + 1
        watch = store.watch(keys.ENGINES, start_revision=start_rev)
        total = DEPLOYMENTS * REPLICAS
        t0 = time.perf_counter()
        # One transaction: the controller sees all 100 deployments at once, so the time measured
        # is the controller's, not this writer's (both share one event loop here).
        await store.txn([], [Put(keys.deployment(s.name), s.encode()) for s in sim_specs()])
        t_written = time.perf_counter()
        scheduled: set[str] = set()
        first_create = 0.0
        async for ev in watch:
            first_create = first_create or time.perf_counter()
            if Engine.model_validate_json(ev.value).state == EngineState.SCHEDULED:
                scheduled.add(ev.key)
                if len(scheduled) == total:
                    break
        t_done = time.perf_counter()
        await watch.aclose()  # type: ignore[attr-defined]
        snap = await read_snapshot(store)
        nodes_used = {e.node for e, _ in snap.engines.values()}
        return {
            "replicas": total,
            "write_deployments_s": round(t_written - t0, 4),
            "apply_concurrency": APPLY_CONCURRENCY,
            "first_record_after_s": round(first_create - t0, 4),
            "all_scheduled_after_s": round(t_done - t0, 4),
            "replicas_per_s": round(total / (t_done - t0)),
            "rounds": controller.rounds,
            "nodes_used": len(nodes_used),
        }
    finally:
        if controller is not None:
            await controller.stop()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        for lease in leases:
            await lease.revoke()
        await store.delete_prefix(keys.ROOT)
        await store.close()


async def placement(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    result: dict[str, Any] = {
        "setup": {
            "nodes": NODES,
            "gpus_per_node": GPUS_PER_NODE,
            "deployments": DEPLOYMENTS,
            "replicas_each": REPLICAS,
            "gpu_memory_utilization": FRACTION,
        },
        "pure_decide": {s: pure_decide(s) for s in STRATEGIES},
        "controller": {"memory": await controller_run("memory://")},
    }
    if not args.no_etcd:
        with tempfile.TemporaryDirectory(prefix="bench-etcd-") as tmp:
            server = None
            url = args.etcd_url
            if not url:
                server = LocalEtcd(Path(tmp) / "data", log_path=Path(tmp) / "etcd.log")
                server.start()
                url = server.url
            try:
                result["controller"]["etcd"] = await controller_run(url)
            finally:
                if server is not None:
                    server.stop()
    lines = [
        f"placement: {DEPLOYMENTS * REPLICAS} replicas over {NODES} nodes x {GPUS_PER_NODE} GPUs",
        f"  {'decide (no I/O)':22} {'place s':>8} {'replicas/s':>11} {'GPUs':>5} {'nodes':>6}",
    ]
    for s, r in result["pure_decide"].items():
        lines.append(
            f"  {s:22} {r['place_s']:8.3f} {r['replicas_per_s']:11d} "
            f"{r['gpus_used']:5d} {r['nodes_used']:6d}"
        )
    lines.append(
        f"  {'controller loop':22} {'all Scheduled s':>15} {'replicas/s':>11} {'rounds':>7}"
    )
    for backend, r in result["controller"].items():
        lines.append(
            f"  {backend:22} {r['all_scheduled_after_s']:15.3f} "
            f"{r['replicas_per_s']:11d} {r['rounds']:7d}"
        )
    return result, lines


# ---- deploy write -> claimed -> Running (a real worker and a real engine) -----------------------


async def _engine_ready_at(endpoint: str, token: str, *, timeout: float) -> float:
    """Wall time at which the engine first answers READY, polled every 20 ms: the engine's own
    load time ends here, whatever the worker's polling adds after it."""
    from deepinfer_nb.engine.client import EngineClient
    from deepinfer_nb.engine.process import poll_ready

    async with EngineClient(endpoint, token=token) as client:
        # The worker watches the process; here only the answer counts.
        outcome = await poll_ready(
            client,
            alive=lambda: True,
            timeout=timeout,
            interval=0.02,
            health_timeout=1.0,
        )
    if outcome != "ready":
        raise TimeoutError(f"engine at {endpoint} not ready after {timeout} s")
    return time.time()


async def deploy_once(url: str, home: Path) -> dict[str, Any]:
    """One deployment of the local SmolLM2 on CPU through the in-process controller and worker;
    times from the deployment write, taken from a watch on the engine record."""
    from deepinfer_nb.config import Settings
    from deepinfer_nb.control.worker import Worker
    from deepinfer_nb.engine import local_models

    store = open_store(url)
    await store.delete_prefix(keys.ROOT)
    settings = Settings()
    settings.scheduler.reconcile_interval_s = 2.0
    settings.agent.stop_grace_s = 5.0
    controller = Controller(store, settings=settings.scheduler, identity="bench")
    task = asyncio.create_task(controller.run())
    worker = Worker(store, node_id="bench-node", settings=settings, home=home)
    await worker.start()
    marks: dict[str, float] = {}
    ready_task: asyncio.Task[float] | None = None
    try:
        await controller.wait_leading(10)
        spec = DeploymentSpec(
            name="bench",
            model=local_models.resolve("smollm2-135m-instruct"),
            device="cpu",
            enforce_eager=True,
            max_model_len=2048,
        )
        start = (await store.range(keys.ROOT)).revision + 1
        watch = store.watch(keys.ENGINES, start_revision=start)
        t0 = time.time()
        await store.put(keys.deployment(spec.name), spec.encode())
        async for ev in watch:
            e = Engine.model_validate_json(ev.value)
            marks.setdefault(e.state.value, time.time())
            if e.state == EngineState.STARTING and e.pid and ready_task is None:
                marks["launched"] = time.time()
                ready_task = asyncio.create_task(
                    _engine_ready_at(e.endpoint, e.auth_token, timeout=600)
                )
            if e.state in (EngineState.RUNNING, EngineState.FAILED):
                break
        await watch.aclose()  # type: ignore[attr-defined]
        if "Running" not in marks or ready_task is None:
            raise RuntimeError(f"engine did not reach Running: {sorted(marks)}")
        ready = await ready_task
        # From the launch as the watch saw it (psutil's process start time is only good to
        # about a second): the engine's own load, and the control plane's share on either side.
        load_s = ready - marks["launched"]
        total = marks["Running"] - t0
        return {
            "pending_record_after_s": round(marks["Pending"] - t0, 4),
            "scheduled_after_s": round(marks["Scheduled"] - t0, 4),
            "claimed_after_s": round(marks["Starting"] - t0, 4),
            "launched_after_s": round(marks["launched"] - t0, 4),
            "running_after_s": round(total, 3),
            "engine_load_s": round(load_s, 3),
            "ready_to_running_s": round(marks["Running"] - ready, 4),
            "control_plane_s": round((marks["launched"] - t0) + (marks["Running"] - ready), 4),
        }
    finally:
        if ready_task is not None:
            ready_task.cancel()
        await store.delete(keys.deployment("bench"))
        await worker.stop()
        await controller.stop()
        await asyncio.gather(task, return_exceptions=True)
        await store.delete_prefix(keys.ROOT)
        await store.close()


async def deploy(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        server = None
        url = "memory://" if args.no_etcd else args.etcd_url
        if not url:
            server = LocalEtcd(Path(tmp) / "data", log_path=Path(tmp) / "etcd.log")
            server.start()
            url = server.url
        try:
            run = await deploy_once(url, Path(tmp) / "home")
        finally:
            if server is not None:
                server.stop()
    result = {
        "store": url.split("://")[0],
        "model": "smollm2-135m-instruct (CPU, eager, bf16)",
        **run,
    }
    lines = [
        f"deploy write -> claimed -> Running ({result['store']} store, 1 worker, SmolLM2 CPU)",
        f"  {'deployment written -> Pending record':40} {run['pending_record_after_s']:8.3f} s",
        f"  {'-> Scheduled':40} {run['scheduled_after_s']:8.3f} s",
        f"  {'-> claimed (Starting)':40} {run['claimed_after_s']:8.3f} s",
        f"  {'-> launched (pid on the record)':40} {run['launched_after_s']:8.3f} s",
        f"  {'-> Running':40} {run['running_after_s']:8.3f} s",
        f"  {'engine own load (launch -> READY)':40} {run['engine_load_s']:8.3f} s",
        f"  {'READY -> Running recorded':40} {run['ready_to_running_s']:8.3f} s",
        f"  {'control plane share':40} {run['control_plane_s']:8.3f} s",
    ]
    return result, lines


SECTIONS: dict[str, Section] = {"placement": placement, "deploy": deploy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--section",
        action="append",
        choices=sorted(SECTIONS),
        help="run only this section (repeatable; default: all)",
    )
    parser.add_argument("--etcd-url", default="", help="use this etcd instead of starting one")
    parser.add_argument("--no-etcd", action="store_true", help="memory:// only")
    args = parser.parse_args()
    existing: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    sections = existing.setdefault("sections", {})
    for name in args.section or list(SECTIONS):
        result, lines = asyncio.run(SECTIONS[name](args))
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        sections[name] = result
        print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
