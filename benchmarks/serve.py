"""The gateway (+ shim + vLLM) against vLLM's own OpenAI server, and the gateway's added latency.

Both sides serve the same model folder (the local SmolLM2 unless --model) with the same engine
flags (--enforce-eager --dtype D --max-model-len 2048, VLLM_CPU_KVCACHE_SPACE=1; D is what
the shim picks for CPU: bfloat16 with native CPU support, else float32), and
the same client (httpx, streaming chat completions, the same prompts, 128 output tokens with
ignore_eos, greedy) at concurrency 1, 16 and 64. Per level: output tokens/s, requests/s, TTFT
p50/p99 and inter-token latency p50, all measured at the client. They never share CPUs: vLLM's
server runs first and is stopped before the cluster starts.

The gateway side is the product as a user runs it: a local etcd, `deepinfer-nb up` (controller,
worker and gateway in one process) and a deployment created with POST /v1/deployments. Its added
latency is then measured on the same engine: one-token chat requests, alternating between the
gateway (HTTP + JSON) and the shim directly (gRPC, `EngineClient`), p50 difference.

    .venv/bin/python benchmarks/serve.py [--model M] [--scale 1.0] [--concurrency 1 16 64]

Prints a table and writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepinfer_nb._proto import engine_service_pb2 as pb  # noqa: E402
from deepinfer_nb.engine import local_models  # noqa: E402
from deepinfer_nb.engine.client import EngineClient  # noqa: E402
from deepinfer_nb.engine.cpu_dtype import best_cpu_dtype  # noqa: E402
from deepinfer_nb.models import Engine, EngineState  # noqa: E402
from deepinfer_nb.netutil import free_port  # noqa: E402
from deepinfer_nb.store import decode_record, keys, open_store  # noqa: E402
from deepinfer_nb.store.local_etcd import LocalEtcd  # noqa: E402

SERVED = "smollm2"
OUTPUT_TOKENS = 128
LEVELS = {1: 6, 16: 32, 64: 128}  # concurrency -> requests (scaled by --scale)
PROMPTS = [f"Write a long story about a lighthouse keeper, chapter {i}." for i in range(256)]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
DTYPE = best_cpu_dtype()
START_TIMEOUT_S = 900.0
LATENCY_SAMPLES = 40


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if values else 0.0


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


# ---- the client workload (identical for both servers) ------------------------------------------


async def one_request(
    http: httpx.AsyncClient, url: str, prompt: str, headers: dict[str, str]
) -> dict[str, Any]:
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": OUTPUT_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    times.append(time.perf_counter())
    if not times:
        raise RuntimeError("no content streamed")
    itl = [b - a for a, b in itertools.pairwise(times)]
    return {"ttft": times[0] - start, "itl": itl, "tokens": tokens}


async def run_level(
    url: str, *, concurrency: int, requests: int, headers: dict[str, str]
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        queue = list(range(requests))
        results: list[dict[str, Any]] = []

        async def user() -> None:
            while queue:
                i = queue.pop()
                results.append(await one_request(http, url, PROMPTS[i % len(PROMPTS)], headers))

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    itls = [x for r in results for x in r["itl"]]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(results) / wall, 3),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1e3, 1),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1e3, 1),
        "itl_p50_ms": round(percentile(itls, 50) * 1e3, 2),
    }


async def run_levels(
    url: str, *, plan: dict[int, int], headers: dict[str, str]
) -> list[dict[str, Any]]:
    # warm-up: the first requests pay one-off costs (allocations, tokenizer caches)
    async with httpx.AsyncClient(timeout=600) as http:
        for i in range(2):
            await one_request(http, url, PROMPTS[i], headers)
    out = []
    for concurrency, requests in plan.items():
        level = await run_level(url, concurrency=concurrency, requests=requests, headers=headers)
        print(f"  c={concurrency}: {level}", flush=True)
        out.append(level)
    return out


# ---- the two servers ---------------------------------------------------------------------------


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, grace: float = 60) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def wait_http(
    url: str, proc: subprocess.Popen[bytes], log: Path, ok: Any = lambda r: r.status_code == 200
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited {proc.returncode}:\n{_tail(log)}")
            try:
                if ok(await http.get(url)):
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(1)


async def bench_vllm(folder: str, *, plan: dict[int, int], work: Path) -> list[dict[str, Any]]:
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
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--dtype",
        DTYPE,
        "--max-model-len",
        "2048",
    ]
    proc = spawn(cmd, log, ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_http(url + "/health", proc, log)
        print("vLLM OpenAI server ready", flush=True)
        return await run_levels(url, plan=plan, headers={})
    finally:
        stop(proc)


async def bench_gateway(
    model: str, *, plan: dict[int, int], work: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    etcd = LocalEtcd(work / "etcd", log_path=work / "etcd.log")
    etcd.start()
    port = free_port()
    log = work / "up.log"
    cmd = [
        sys.executable,
        "-c",
        "from deepinfer_nb.cli import main; raise SystemExit(main())",
        "up",
        "--store",
        etcd.url,
        "--node",
        "bench",
        "--gateway-port",
        str(port),
    ]
    proc = spawn(cmd, log, {})
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(url + "/health", proc, log)
        spec = {
            "model": model,
            "name": SERVED,
            "device": "cpu",
            "dtype": DTYPE,
            "enforce_eager": True,
            "max_model_len": 2048,
            "env": ENV,
        }
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(url + "/v1/deployments", json=spec)
            r.raise_for_status()
        await wait_http(
            url + f"/v1/deployments/{SERVED}",
            proc,
            log,
            ok=lambda r: r.status_code == 200 and r.json()["ready_replicas"] == 1,
        )
        await wait_http(
            url + "/v1/models",
            proc,
            log,
            ok=lambda r: any(m["id"] == SERVED for m in r.json()["data"]),
        )
        print("gateway + shim + vLLM ready", flush=True)
        levels = await run_levels(url, plan=plan, headers={})
        added = await added_latency(url, etcd.url)
        return levels, added
    finally:
        stop(proc)
        etcd.stop()


async def added_latency(url: str, store_url: str) -> dict[str, Any]:
    """One-token chat requests, alternating gateway and shim-direct, on the same engine."""
    async with open_store(store_url) as store:
        result = await store.range(keys.ENGINES)
    engine = next(
        e
        for kv in result.items
        if (e := decode_record(Engine, kv.key, kv.value)) is not None
        and e.state is EngineState.RUNNING
    )
    message = "What is the capital of France?"
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": 1,
        "temperature": 0,
    }
    req = pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=message)],
        sampling=pb.SamplingParams(max_tokens=1, temperature=0),
    )
    via_gateway: list[float] = []
    direct: list[float] = []
    async with (
        httpx.AsyncClient(timeout=60) as http,
        EngineClient(engine.endpoint, token=engine.auth_token) as client,
    ):
        for i in range(LATENCY_SAMPLES + 4):
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/chat/completions", json=body)
            r.raise_for_status()
            t1 = time.perf_counter()
            await client.chat(req)
            t2 = time.perf_counter()
            if i >= 4:  # the first few warm connections and caches
                via_gateway.append(t1 - t0)
                direct.append(t2 - t1)
    p50_g, p50_d = percentile(via_gateway, 50), percentile(direct, 50)
    return {
        "samples": len(direct),
        "gateway_p50_ms": round(p50_g * 1e3, 2),
        "shim_direct_p50_ms": round(p50_d * 1e3, 2),
        "added_p50_ms": round((p50_g - p50_d) * 1e3, 2),
        "gateway_p90_ms": round(percentile(via_gateway, 90) * 1e3, 2),
        "shim_direct_p90_ms": round(percentile(direct, 90) * 1e3, 2),
    }


# ---- report ------------------------------------------------------------------------------------


def table(vllm: list[dict[str, Any]], gw: list[dict[str, Any]]) -> str:
    head = (
        "| c | server | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms |\n"
        "|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for v, g in zip(vllm, gw, strict=True):
        for name, x in (("vLLM server", v), ("gateway", g)):
            rows.append(
                f"| {x['concurrency']} | {name} | {x['output_tokens_per_s']} | "
                f"{x['requests_per_s']} | {x['ttft_p50_ms']} | {x['ttft_p99_ms']} | "
                f"{x['itl_p50_ms']} |"
            )
        rows.append(
            f"| {v['concurrency']} | gateway / vLLM | "
            f"{g['output_tokens_per_s'] / v['output_tokens_per_s']:.2f}x | "
            f"{g['requests_per_s'] / v['requests_per_s']:.2f}x | "
            f"{g['ttft_p50_ms'] / v['ttft_p50_ms']:.2f}x | "
            f"{g['ttft_p99_ms'] / v['ttft_p99_ms']:.2f}x | "
            f"{g['itl_p50_ms'] / v['itl_p50_ms']:.2f}x |"
        )
    return "\n".join(rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the requests per level (default 1: 6, 32, 128)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=list(LEVELS),
        help="levels to run (default: 1 16 64)",
    )
    args = parser.parse_args()
    folder = str(local_models.resolve(args.model))
    work = Path(tempfile.mkdtemp(prefix="deepinfer-bench-serve-"))
    print(f"model {folder}; logs in {work}", flush=True)
    plan = {c: max(1, round(n * args.scale)) for c, n in LEVELS.items() if c in args.concurrency}
    print(f"plan (concurrency: requests): {plan}", flush=True)
    vllm = await bench_vllm(folder, plan=plan, work=work)
    gw, added = await bench_gateway(args.model, plan=plan, work=work)
    report = table(vllm, gw)
    print(report)
    print(f"gateway added latency (1-token chat, p50): {added}")
    out = {
        "benchmark": "serve",
        "model": args.model,
        "engine_flags": f"--enforce-eager --dtype {DTYPE} --max-model-len 2048, "
        "VLLM_CPU_KVCACHE_SPACE=1",
        "output_tokens": OUTPUT_TOKENS,
        "plan": {str(c): n for c, n in plan.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "vllm_server": vllm,
        "gateway": gw,
        "ratios": [
            {
                "concurrency": v["concurrency"],
                "throughput": round(g["output_tokens_per_s"] / v["output_tokens_per_s"], 3),
                "ttft_p50": round(g["ttft_p50_ms"] / v["ttft_p50_ms"], 3),
                "itl_p50": round(g["itl_p50_ms"] / v["itl_p50_ms"], 3),
            }
            for v, g in zip(vllm, gw, strict=True)
        ],
        "added_latency": added,
        "table_markdown": report,
    }
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "serve.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {results / 'serve.json'}")


if __name__ == "__main__":
    asyncio.run(main())
