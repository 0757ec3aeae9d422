"""Control-plane benchmarks. Prints a table per section; merges into
benchmarks/results/control_plane.json (each section replaces only its own key).

Sections (`--section NAME`, repeatable; default: all registered):

- `placement`: controller throughput placing 1,000 replicas (100 deployments x 10) over 100
  simulated nodes (8 x 80 GiB GPUs each, registered under leases like real workers), from the
  deployment writes until every engine record is Scheduled. Measured for the pure decision
  (`reconcile.decide`, no I/O, per strategy), the real controller loop on `memory://`, and the
  real controller loop on a real etcd (started here from the `etcd` binary, or `--etcd-url`).

Another section ("deploy write -> claimed -> Running") is added by registering a coroutine in
`SECTIONS`: it receives the parsed args and returns its JSON-able result plus table lines.

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


SECTIONS: dict[str, Section] = {"placement": placement}


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
