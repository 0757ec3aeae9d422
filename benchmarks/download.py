"""Hub download throughput: the worker's download (a real Worker claiming a deployment of a hub
repo, Downloading with progress written to the store) against `huggingface_hub.snapshot_download`
called directly (the limit), same files, from the local hub double (tests/fixtures/hub.py)
serving the built SmolLM2 folder on 127.0.0.1. Each round uses fresh caches; the order
alternates. The worker's time is its Downloading stage (claim -> Starting, from the record's
transitions); its engine then starts from an interpreter that exits at once, so no model loads.
Prints a table; writes benchmarks/results/download.json.

    .venv/bin/python benchmarks/download.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the hub double in tests/

from deepinfer_nb.config import Settings
from deepinfer_nb.control.controller import Controller
from deepinfer_nb.control.downloads import ALLOW_PATTERNS, IGNORE_PATTERNS
from deepinfer_nb.control.worker import Worker
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState
from deepinfer_nb.store import decode_record, keys
from deepinfer_nb.store.memory import MemoryStore
from tests.fixtures.hub import REPO, HubDouble, smollm2_folder

RESULTS = Path(__file__).parent / "results" / "download.json"


def direct(url: str, cache: Path) -> float:
    from huggingface_hub import snapshot_download

    t0 = time.perf_counter()
    snapshot_download(
        REPO,
        cache_dir=cache,
        allow_patterns=ALLOW_PATTERNS,
        ignore_patterns=IGNORE_PATTERNS,
        endpoint=url,
        token=False,
    )
    return time.perf_counter() - t0


async def through_worker(url: str, home: Path) -> float:
    settings = Settings()
    settings.scheduler.reconcile_interval_s = 0.2
    settings.agent.hub_endpoint = url
    settings.agent.hub_cache = str(home / "hub")
    settings.agent.engine_python = shutil.which("false") or "/bin/false"
    store = MemoryStore()
    controller = Controller(store, settings=settings.scheduler)
    running = asyncio.create_task(controller.run())
    worker = Worker(store, node_id="bench", settings=settings, home=home)
    await worker.start()
    try:
        spec = DeploymentSpec(name="dl", model=REPO, device="cpu", max_restarts=0)
        await store.put(keys.deployment("dl"), spec.encode())
        while True:
            result = await store.range(keys.ENGINES)
            engines = [decode_record(Engine, kv.key, kv.value) for kv in result.items]
            history = [t for e in engines if e is not None for t in e.history]
            at = {t.state: t.at for t in history}
            if EngineState.DOWNLOADING in at and any(
                t.state is EngineState.STARTING and t.at >= at[EngineState.DOWNLOADING]
                for t in history
            ):
                starting = min(
                    t.at
                    for t in history
                    if t.state is EngineState.STARTING and t.at >= at[EngineState.DOWNLOADING]
                )
                return starting - at[EngineState.DOWNLOADING]
            failed = [e.error for e in engines if e is not None and e.state is EngineState.FAILED]
            if failed and EngineState.STARTING not in at:
                raise RuntimeError(f"download failed: {failed[0]}")
            await asyncio.sleep(0.05)
    finally:
        await store.delete(keys.deployment("dl"))
        await worker.stop()
        await controller.stop()
        await asyncio.gather(running, return_exceptions=True)
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = smollm2_folder()
    size = sum(p.stat().st_size for p in folder.iterdir() if not p.name.startswith("."))
    rows: list[dict[str, Any]] = []
    with HubDouble(repos={REPO: folder}) as hub:
        for i in range(args.rounds):
            order = ["direct", "worker"] if i % 2 == 0 else ["worker", "direct"]
            for kind in order:
                work = Path(tempfile.mkdtemp(prefix=f"deepinfer-dl-{kind}-"))
                try:
                    if kind == "direct":
                        seconds = direct(hub.url, work / "hub")
                    else:
                        seconds = asyncio.run(through_worker(hub.url, work))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                rows.append({"round": i, "path": kind, "seconds": round(seconds, 3)})
                print(f"round {i} {kind:7} {seconds:6.2f} s  {size / seconds / 1e6:7.1f} MB/s")
    med = {
        kind: statistics.median(r["seconds"] for r in rows if r["path"] == kind)
        for kind in ("direct", "worker")
    }
    ratio = med["direct"] / med["worker"]
    summary = {
        "bytes": size,
        "direct_mb_s": round(size / med["direct"] / 1e6, 1),
        "worker_mb_s": round(size / med["worker"] / 1e6, 1),
        "worker_vs_direct": round(ratio, 3),
        "target": ">= 0.95",
        "rounds": rows,
        "host": platform.node(),
        "python": platform.python_version(),
    }
    print(
        f"median: direct {summary['direct_mb_s']} MB/s, worker {summary['worker_mb_s']} MB/s, "
        f"worker/direct {ratio:.3f}x (target >= 0.95)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
