"""Deploy to first token: our engine started cold, our engine from a warm pool, and vLLM's own
OpenAI server started from nothing.

    .venv/bin/python benchmarks/cold_start.py [--rounds 3] [--model smollm2-135m-instruct]

Sides, same model folder and engine flags (--enforce-eager --dtype D --max-model-len 2048,
VLLM_CPU_KVCACHE_SPACE=1; D is what the shim picks on this CPU):

(a) cold: the in-kernel services (`deepinfer_nb.connect`: memory store, controller, worker,
    gateway on 127.0.0.1) with `[agent] warm_pool = 0`; the clock starts at `cluster.deploy`
    (the deployment write) and stops at the engine record's Running, then at the first streamed
    token of a chat request sent through the gateway (OpenAI streaming, aiohttp);
(b) warm: the same with `warm_pool = 1`, once the worker reports its member warm (the premise of
    a warm pool: an idle node has one waiting);
(c) vLLM: `python -m vllm.entrypoints.openai.api_server` started from nothing; "Running" is its
    /v1/models answering 200, then the first streamed token of the same request.

Rounds interleave the sides (a b c, b c a, c a b, ...) so drift on a shared machine hits all
three alike. Steady state: after each round of (a) and (b), 16 concurrent streams of 128 tokens
(ignore_eos, greedy) through the gateway; for (b) only once the pool has refilled and its new
member is idle (a member importing torch would take CPU from the engine under test).

Prints a table and writes benchmarks/results/cold_start.json (every round, medians, ratios to c).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import deepinfer_nb  # noqa: E402
from deepinfer_nb.client.cluster import Cluster  # noqa: E402
from deepinfer_nb.config import Settings  # noqa: E402
from deepinfer_nb.engine import local_models  # noqa: E402
from deepinfer_nb.engine.cpu_dtype import best_cpu_dtype  # noqa: E402
from deepinfer_nb.models import EngineState  # noqa: E402
from deepinfer_nb.netutil import free_port  # noqa: E402

NODE = f"cold-start-{os.getpid()}"
NAME = "smollm2"
PROMPT = "What is the capital of France? Answer in one word."
STREAMS, STREAM_TOKENS = 16, 128
TIMEOUT_S = 600.0
RESULTS = ROOT / "benchmarks" / "results" / "cold_start.json"


def settings(pool: int) -> Settings:
    s = Settings()
    s.agent.warm_pool = pool
    s.agent.gpu_sample_interval_s = 0.5
    s.agent.health_check_interval_s = 0.5
    s.scheduler.reconcile_interval_s = 0.2
    return s


def wait(what: str, probe: Any, timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(0.05)
    return found


def pool_idle(cluster: Cluster) -> list[int] | None:
    """The pids of the pool's members once one is warm and none is still importing."""
    samples = cluster.snapshot().gpus.get(NODE)
    pool = samples.warm_pool if samples is not None else None
    return pool.pids if pool is not None and pool.warm >= 1 and pool.starting == 0 else None


async def first_token(url: str, model: str) -> float:
    """Seconds to the first streamed content token of one chat request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/chat/completions", json=body) as r,
    ):
        r.raise_for_status()
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                return time.monotonic() - started
    raise RuntimeError("the stream ended without a token")


async def throughput(url: str, model: str) -> float:
    """Output tokens/s over STREAMS concurrent streams of STREAM_TOKENS tokens."""

    async def one(http: aiohttp.ClientSession, i: int) -> int:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Tell a long story, part {i}."}],
            "max_tokens": STREAM_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tokens = 0
        async with http.post(f"{url}/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data:") and '"usage":{' in line:
                    usage = json.loads(line[5:]).get("usage") or {}
                    tokens = int(usage.get("completion_tokens") or tokens)
        return tokens

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        await one(http, -1)  # warm-up
        started = time.monotonic()
        counts = await asyncio.gather(*(one(http, i) for i in range(STREAMS)))
        return sum(counts) / (time.monotonic() - started)


def ours(pool: int, model_path: str) -> dict[str, Any]:
    cluster = deepinfer_nb.connect(
        "memory://", worker=True, gateway_port=0, node_id=NODE, settings=settings(pool)
    )
    try:
        url = cluster.gateway_url
        assert url is not None
        members = wait("a warm pool member", lambda: pool_idle(cluster)) if pool else []
        started = time.monotonic()
        cluster.deploy(model_path, name=NAME, device="cpu", enforce_eager=True, max_model_len=2048)
        engine = wait("Running", lambda: _running(cluster))
        running = time.monotonic() - started
        asyncio.run(first_token(url, NAME))
        token = time.monotonic() - started
        out = {"running_s": running, "first_token_s": token, "pooled": engine.pid in members}
        if pool:
            wait("the pool refilled and idle", lambda: pool_idle(cluster))
        out["tokens_per_s"] = asyncio.run(throughput(url, NAME))
        return out
    finally:
        cluster.shutdown(timeout=120)


def _running(cluster: Cluster) -> Any:
    for e in cluster.snapshot().engines_of(NAME):
        if e.state == EngineState.RUNNING:
            return e
    return None


def vllm(model_path: str, dtype: str) -> dict[str, float]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_path,
        "--served-model-name",
        NAME,
        "--dtype",
        dtype,
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log, _process(cmd, log) as proc:
        started = time.monotonic()
        asyncio.run(_until_serving(url, proc, log))
        running = time.monotonic() - started
        asyncio.run(first_token(url, NAME))
        return {"running_s": running, "first_token_s": time.monotonic() - started}


@contextlib.contextmanager
def _process(cmd: list[str], log: Any) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()


async def _until_serving(url: str, proc: subprocess.Popen[bytes], log: Any) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"vLLM's server exited: {log.read()[-2000:].decode()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{url}/v1/models") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise TimeoutError("vLLM's server: not serving")


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in ("a_cold", "b_warm", "c_vllm"):
        rows = [r[side] for r in rounds]
        out[side] = {
            key: statistics.median(row[key] for row in rows) for key in rows[0] if key != "pooled"
        }
    c = out["c_vllm"]
    for side in ("a_cold", "b_warm"):
        out[side]["speedup_to_first_token_vs_c"] = c["first_token_s"] / out[side]["first_token_s"]
        out[side]["speedup_to_running_vs_c"] = c["running_s"] / out[side]["running_s"]
    a, b = out["a_cold"], out["b_warm"]
    out["b_tokens_per_s_vs_a"] = b["tokens_per_s"] / a["tokens_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    model_path = str(local_models.build(local_models.CATALOG[args.model]))
    dtype = best_cpu_dtype()
    sides = {
        "a_cold": lambda: ours(0, model_path),
        "b_warm": lambda: ours(1, model_path),
        "c_vllm": lambda: vllm(model_path, dtype),
    }
    order = list(sides)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        result: dict[str, Any] = {}
        for side in order[r % 3 :] + order[: r % 3]:
            result[side] = sides[side]()
            print(f"round {r + 1} {side}: {json.dumps(result[side])}", flush=True)
        rounds.append(result)
    summary = summarize(rounds)
    print(table(summary))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "model": args.model,
                "dtype": dtype,
                "rounds": rounds,
                "median": summary,
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


def table(s: dict[str, Any]) -> str:
    lines = [
        "| side | write -> Running | write -> first token | x faster than (c) | tokens/s c=16 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    labels = {
        "a_cold": "(a) ours, pool empty",
        "b_warm": "(b) ours, warm pool",
        "c_vllm": "(c) vLLM api_server",
    }
    for side, label in labels.items():
        row = s[side]
        speed = row.get("speedup_to_first_token_vs_c", 1.0)
        tps = f"{row['tokens_per_s']:.1f}" if "tokens_per_s" in row else "-"
        lines.append(
            f"| {label} | {row['running_s']:.1f} s | {row['first_token_s']:.1f} s | "
            f"{speed:.1f} | {tps} |"
        )
    lines.append(f"\n(b) tokens/s relative to (a): {s['b_tokens_per_s_vs_a']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
