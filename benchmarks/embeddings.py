"""Embeddings through the gateway (+ shim + vLLM) against vLLM's own OpenAI server.

Both sides serve the locally built all-MiniLM-L6-v2 with vLLM's pooling runner and the same flags
(--enforce-eager --dtype D, VLLM_CPU_KVCACHE_SPACE=1; D as the shim picks it for CPU; the
model's own 256-token window). The gateway side is the product as a user runs it:
`deepinfer-nb up` (memory store, controller, worker and gateway in one process) and a
deployment created with POST /v1/deployments. The client is aiohttp (light, as in serve.py),
one request at a time.

For batches of 1, 32 and 256 short texts per request: embeddings/s (texts embedded over the time
spent in requests) and p50 request latency, per side, after one unmeasured warm-up request per
side; the requests of a batch size run in rounds in ABBA order (vLLM, gateway, gateway, vLLM,
...) so a machine whose speed drifts slows both sides alike. Ratios are gateway / vLLM for
embeddings/s and vLLM / gateway for latency, so >= 1.0 means the gateway is at least as fast;
each is computed per round (the two sides' requests of that round) and reported as the median over
rounds with its spread (min-max), beside the pooled figures. Before measuring, the gateway's vectors
are checked against vLLM's for the same texts (float and base64; cosine >= 0.9999).

    .venv/bin/python benchmarks/embeddings.py [--rounds 5]

Prints a table and writes benchmarks/results/embeddings.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from serve import NO_POOL, spawn, spread, stop, wait_http  # noqa: E402

from deepinfer_nb.engine import local_models  # noqa: E402
from deepinfer_nb.engine.cpu_dtype import best_cpu_dtype  # noqa: E402
from deepinfer_nb.netutil import free_port  # noqa: E402

SERVED = "minilm"
ALIAS = "all-minilm-l6-v2"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
DTYPE = best_cpu_dtype()
REQUESTS = {1: 200, 32: 30, 256: 8}  # batch size -> requests per side and round (~1-2 s each:
# shorter rounds let one scheduling stall of a shared machine swing a round's ratio 4x)
TEXTS = [
    f"Sentence number {i} about {topic}."
    for i, topic in enumerate(["cats", "markets", "weather", "football", "music", "code"] * 60)
]


@contextlib.asynccontextmanager
async def vllm_side(folder: str, work: Path) -> AsyncIterator[str]:
    port = free_port()
    log = work / "vllm_server.log"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        folder,
        "--served-model-name",
        SERVED,
        "--runner",
        "pooling",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--dtype",
        DTYPE,
    ]
    proc = spawn(cmd, log, ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_http(url + "/health", proc, log)
        yield url
    finally:
        stop(proc)


@contextlib.asynccontextmanager
async def gateway_side(work: Path) -> AsyncIterator[str]:
    port = free_port()
    log = work / "up.log"
    cmd = [
        sys.executable,
        "-c",
        "from deepinfer_nb.cli import main; raise SystemExit(main())",
        "up",
        "--store",
        "memory://",
        "--node",
        "bench",
        "--gateway-port",
        str(port),
    ]
    proc = spawn(cmd, log, NO_POOL)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(url + "/health", proc, log)
        spec = {
            "model": ALIAS,
            "name": SERVED,
            "device": "cpu",
            "dtype": DTYPE,
            "enforce_eager": True,
            "task": "embed",
            "env": ENV,
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(url + "/v1/deployments", json=spec) as r,
        ):
            if r.status >= 400:
                raise RuntimeError(f"POST /v1/deployments: {r.status} {await r.text()}")
        await wait_http(
            url + f"/v1/deployments/{SERVED}",
            proc,
            log,
            ok=lambda status, body: status == 200 and body["ready_replicas"] == 1,
        )
        yield url
    finally:
        stop(proc)


async def embed(
    http: aiohttp.ClientSession, url: str, texts: list[str], encoding: str = "float"
) -> tuple[float, list[Any]]:
    body = {"model": SERVED, "input": texts, "encoding_format": encoding}
    start = time.perf_counter()
    async with http.post(url + "/v1/embeddings", json=body) as r:
        data = await r.json()
        if r.status != 200 or len(data["data"]) != len(texts):
            raise RuntimeError(f"{url}: {r.status} {str(data)[:300]}")
    return time.perf_counter() - start, [d["embedding"] for d in data["data"]]


def _vector(e: Any) -> list[float]:
    if isinstance(e, str):  # base64: little-endian float32
        raw = base64.b64decode(e)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return [float(x) for x in e]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def same_vectors(http: aiohttp.ClientSession, urls: dict[str, str]) -> float:
    """The least cosine between vLLM's and the gateway's vectors of the same texts, in both
    encodings (the gateway writes float32 bytes as JSON or base64; vLLM its own floats)."""
    texts = TEXTS[:16]
    least = 1.0
    for encoding in ("float", "base64"):
        _, theirs = await embed(http, urls["vllm"], texts, encoding)
        _, ours = await embed(http, urls["gateway"], texts, encoding)
        for a, b in zip(theirs, ours, strict=True):
            least = min(least, _cosine(_vector(a), _vector(b)))
    if least < 0.9999:
        raise RuntimeError(f"the gateway's embeddings differ from vLLM's (cosine {least:.6f})")
    return least


async def measure(urls: dict[str, str], rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        for url in urls.values():
            await embed(http, url, TEXTS[:8])  # warm-up
        out["least_cosine_vllm_vs_gateway"] = await same_vectors(http, urls)
        for batch, count in REQUESTS.items():
            # lat[side][round]: the latencies of that side's requests in that round
            lat: dict[str, list[list[float]]] = {side: [] for side in urls}
            order = list(urls)
            for r in range(rounds):
                for side in order if r % 2 == 0 else order[::-1]:
                    times = []
                    for i in range(count):
                        texts = [TEXTS[(i * batch + k) % len(TEXTS)] for k in range(batch)]
                        times.append((await embed(http, urls[side], texts))[0])
                    lat[side].append(times)
            pooled = {
                side: {
                    "requests": sum(len(t) for t in rounds_),
                    "embeddings_per_s": batch
                    * sum(len(t) for t in rounds_)
                    / sum(sum(t) for t in rounds_),
                    "p50_ms": statistics.median([x for t in rounds_ for x in t]) * 1000,
                }
                for side, rounds_ in lat.items()
            }
            v, g = lat["vllm"], lat["gateway"]
            out[str(batch)] = {
                **pooled,
                # per round: gateway / vLLM embeddings/s, and vLLM / gateway p50 latency
                "throughput_ratio": spread([sum(a) / sum(b) for a, b in zip(v, g, strict=True)]),
                "latency_ratio": spread(
                    [statistics.median(a) / statistics.median(b) for a, b in zip(v, g, strict=True)]
                ),
            }
            print(f"batch {batch}: {out[str(batch)]}", flush=True)
    return out


def table(results: dict[str, Any]) -> str:
    lines = [
        "batch | vLLM emb/s | gateway emb/s | vLLM p50 ms | gateway p50 ms | "
        "throughput ratio, median [min-max] | p50 latency ratio, median [min-max] | per round",
        "----- | ---------- | ------------- | ----------- | -------------- | "
        "---------------------------------- | ----------------------------------- | ---------",
    ]
    for batch, r in results.items():
        if not batch.isdigit():
            continue
        v, g, t, lat = r["vllm"], r["gateway"], r["throughput_ratio"], r["latency_ratio"]
        lines.append(
            f"{batch} | {v['embeddings_per_s']:.1f} | {g['embeddings_per_s']:.1f} | "
            f"{v['p50_ms']:.1f} | {g['p50_ms']:.1f} | "
            f"{t['median']:.2f}x [{t['min']:.2f}-{t['max']:.2f}] | "
            f"{lat['median']:.2f}x [{lat['min']:.2f}-{lat['max']:.2f}] | "
            + ", ".join(f"{x:.2f}" for x in t["per_round"])
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    folder = str(local_models.build(local_models.CATALOG[ALIAS]))
    work = Path(tempfile.mkdtemp(prefix="bench-embeddings-"))
    async with vllm_side(folder, work) as vllm_url, gateway_side(work) as gw_url:
        print("both sides ready", flush=True)
        results = await measure({"vllm": vllm_url, "gateway": gw_url}, args.rounds)
    load = os.getloadavg()
    print(table(results))
    print(f"load average (1, 5, 15 min) at the end: {load}")
    out = HERE / "results" / "embeddings.json"
    out.parent.mkdir(exist_ok=True)
    payload = {
        "benchmark": "embeddings",
        "model": ALIAS,
        "dtype": DTYPE,
        "rounds": args.rounds,
        "requests_per_side_and_round": REQUESTS,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": load,
        },
        "results": results,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
