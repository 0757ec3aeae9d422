"""MetaStore latency: put, CAS (a compare-and-swap transaction) and put-to-watch-delivery, p50/p99,
for `memory://` and a real etcd (started here from the `etcd` binary on a temp data dir, or
`--etcd-url` for one already running). Prints a table; writes benchmarks/results/store.json.

    .venv/bin/python benchmarks/store.py [--n 500] [--etcd-url etcd://127.0.0.1:2379]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from deepinfer_nb.store import MetaStore, open_store
from deepinfer_nb.store.local_etcd import LocalEtcd

RESULTS = Path(__file__).parent / "results" / "store.json"
PREFIX = "/bench/store/"


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "p50_ms": round(statistics.median(ms), 4),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "n": len(ms),
    }


async def bench_put(store: MetaStore, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await store.put(f"{PREFIX}put/{i % 50}", b'{"i": %d}' % i)
        out.append(time.perf_counter() - t0)
    return out


async def bench_cas(store: MetaStore, n: int) -> list[float]:
    key = PREFIX + "cas"
    await store.put(key, b"0")
    kv = await store.get(key)
    out = []
    for i in range(n):
        assert kv is not None
        t0 = time.perf_counter()
        res = await store.compare_and_swap(kv, str(i).encode())
        out.append(time.perf_counter() - t0)
        if not res.succeeded:
            raise RuntimeError("uncontended CAS failed: the store is broken")
        kv = await store.get(key)
    return out


async def bench_watch(store: MetaStore, n: int) -> list[float]:
    start = (await store.range(PREFIX)).revision + 1
    watch = store.watch(PREFIX + "w/", start_revision=start)
    out = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            rev = await store.put(f"{PREFIX}w/{i % 50}", b"x")
            ev = await asyncio.wait_for(watch.__anext__(), 10)
            out.append(time.perf_counter() - t0)
            if ev.revision != rev:
                raise RuntimeError(f"watch delivered revision {ev.revision}, expected {rev}")
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    return out


async def run_backend(url: str, n: int) -> dict[str, Any]:
    store = open_store(url)
    try:
        await store.delete_prefix(PREFIX)
        await bench_put(store, min(n, 50))  # warm-up: connection, first allocations
        return {
            "put": summary(await bench_put(store, n)),
            "cas": summary(await bench_cas(store, n)),
            "put_to_watch": summary(await bench_watch(store, n)),
        }
    finally:
        await store.delete_prefix(PREFIX)
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="operations per measurement")
    parser.add_argument("--etcd-url", default="", help="use this etcd instead of starting one")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "n": args.n,
        "backends": {},
    }
    results["backends"]["memory"] = asyncio.run(run_backend("memory://", args.n))
    with tempfile.TemporaryDirectory(prefix="bench-etcd-") as tmp:
        server = None
        url = args.etcd_url
        if not url:
            server = LocalEtcd(Path(tmp) / "data", log_path=Path(tmp) / "etcd.log")
            server.start()
            url = server.url
            results["etcd_data_dir"] = "temp dir on " + str(Path(tmp).anchor)
        try:
            results["backends"]["etcd"] = asyncio.run(run_backend(url, args.n))
        finally:
            if server is not None:
                server.stop()
    print(f"{'backend':8} {'operation':14} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for backend, ops in results["backends"].items():
        for op, s in ops.items():
            print(f"{backend:8} {op:14} {s['p50_ms']:9.3f} {s['p99_ms']:9.3f} {s['mean_ms']:9.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
