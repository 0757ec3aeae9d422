"""The gateway (+ shim + vLLM) against vLLM's own OpenAI server, and the gateway's added latency.

Both sides serve the same model folder (the local SmolLM2 unless --model) with the same engine
flags (--enforce-eager --dtype D --max-model-len 2048, VLLM_CPU_KVCACHE_SPACE=1; D is what
the shim picks for CPU: bfloat16 with native CPU support, else float32), and the same client
(aiohttp, which vLLM's own serving benchmark uses; streaming chat completions, the same prompts,
128 output tokens with ignore_eos, greedy) at concurrency 1, 16 and 64. Per level: output
tokens/s, requests/s, TTFT p50/p99 and inter-token latency p50, all measured at the client.

Both servers are started, then each level runs, after one unmeasured warm-up wave per side, in
interleaved rounds (--rounds, default 4) in ABBA order: vLLM then gateway, gateway then vLLM, ...
Only one side has requests at a time (the other sits idle: its engine neither spins nor steps),
and a shared machine whose speed drifts over minutes (these 2-core VMs drift by 10% and more)
slows both sides alike instead of whichever ran second. A side's figures are over all its
rounds; per-round ratios are in the JSON, and so are the CPU the idle side used while the other ran
and, per side, the CPU per output token of its front end (vLLM's API server process; the shim and
`deepinfer-nb up`), of its engine (EngineCore and Worker) and of etcd, while it ran.

The gateway side is the product as a user runs it: a local etcd, `deepinfer-nb up` (controller,
worker and gateway in one process) and a deployment created with POST /v1/deployments. Its added
latency is measured on the same engine: one-token requests in pairs, one through the gateway
(HTTP + JSON) and one to the shim directly (gRPC, `EngineClient`), in alternating order; the
figure is the median of the per-pair differences, with a bootstrap 95% interval. The engine's
own jitter is milliseconds (pair differences spread over -8 to +12 ms, deciles), so the median
needs hundreds of pairs to be good to about half a millisecond. Two kinds: a chat question, and
the smallest request there is (a completion of a one-word prompt), whose engine time and jitter
are a third of the chat's.

Why aiohttp: the client shares this machine's two cores with both servers, and a heavy client
takes from the server under test. httpx costs about 1.5 ms CPU per small request here and aiohttp
0.45 ms (same gateway, same requests); httpx alone added about 3 ms to the added latency.

    .venv/bin/python benchmarks/serve.py [--model M] [--scale 1.0] [--rounds 4]
        [--concurrency 1 16 64]

Prints a table and writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

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
LEVELS = {1: 2, 16: 16, 64: 64}  # concurrency -> requests per side and round (times --scale)
PROMPTS = [f"Write a long story about a lighthouse keeper, chapter {i}." for i in range(256)]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
DTYPE = best_cpu_dtype()
START_TIMEOUT_S = 900.0
LATENCY_PAIRS = {"chat": 200, "completion": 600}


NO_POOL = {"DEEPINFER_AGENT__WARM_POOL": "0"}
"""`up` keeps no warm engine process: its imports would run beside the measured engines (the
pool is a start-up feature: benchmarks/cold_start.py measures it)."""


def spread(values: list[float]) -> dict[str, Any]:
    """Per-round ratios with their median and range (the benchmarks' summary of a ratio)."""
    return {
        "per_round": [round(v, 4) for v in values],
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if values else 0.0


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


# ---- the client workload (identical for both servers) ------------------------------------------


async def one_request(http: aiohttp.ClientSession, url: str, prompt: str) -> dict[str, Any]:
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
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
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


async def run_round(
    url: str, *, concurrency: int, requests: int, first: int
) -> tuple[list[dict[str, Any]], float]:
    """`requests` requests (prompts `first`, `first`+1, ...) by `concurrency` users; the
    results and the wall time."""
    async with _session(600, connections=concurrency + 8) as http:
        queue = list(range(first, first + requests))
        results: list[dict[str, Any]] = []

        async def user() -> None:
            while queue:
                i = queue.pop(0)
                results.append(await one_request(http, url, PROMPTS[i % len(PROMPTS)]))

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def _session(timeout: float, *, connections: int = 100) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout),
        connector=aiohttp.TCPConnector(limit=connections),
    )


def summarize(concurrency: int, results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
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


@dataclasses.dataclass
class Side:
    """One server under test: its name in the report, its URL and the roots of its process
    trees (whose CPU is counted, by role, while it runs and while it sits idle)."""

    name: str
    url: str
    roots: list[int]

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far by role: "engine" (vLLM's EngineCore and Worker processes, which
        name themselves VLLM::...), "etcd", and "front end" (everything else: vLLM's API
        server, or the shim and `deepinfer-nb up`)."""
        total = dict.fromkeys(ROLES, 0.0)
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                for p in [root, *root.children(recursive=True)]:
                    t = p.cpu_times()
                    total[_role(p.name())] += t.user + t.system
            except psutil.Error:
                continue
        return total


ROLES = ("front end", "engine", "etcd")


def _role(name: str) -> str:
    return "engine" if name.startswith("VLLM::") else "etcd" if name == "etcd" else "front end"


def _spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: after[role] - before[role] for role in ROLES}


async def run_levels(
    vllm: Side, gateway: Side, *, plan: dict[int, int], rounds: int
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Every level in `rounds` interleaved rounds (ABBA) of `plan[concurrency]` requests a
    side; per side the levels' summaries, and per level the rounds' throughputs and the idle
    side's CPU."""
    sides = (vllm, gateway)
    summaries: dict[str, list[dict[str, Any]]] = {side.name: [] for side in sides}
    details = []
    for concurrency, requests in plan.items():
        # warm-up, unmeasured: on both sides a level's first wave ran 5-15% slower than the
        # next ones (a one-off cost, cause not pinned down), and in round 1 only one side paid it
        for side in sides:
            await run_round(side.url, concurrency=concurrency, requests=concurrency, first=0)
        results: dict[str, list[dict[str, Any]]] = {side.name: [] for side in sides}
        walls = dict.fromkeys(results, 0.0)
        idle_cpu = dict.fromkeys(results, 0.0)
        busy_cpu = {name: dict.fromkeys(ROLES, 0.0) for name in results}
        round_rows = []
        for r in range(rounds):
            row: dict[str, Any] = {"round": r + 1}
            for side in sides if r % 2 == 0 else sides[::-1]:
                idle = gateway if side is vllm else vllm
                idle0, busy0 = idle.cpu_s(), side.cpu_s()
                out, wall = await run_round(
                    side.url,
                    concurrency=concurrency,
                    requests=requests,
                    first=r * requests,
                )
                idle_cpu[idle.name] += sum(_spent(idle0, idle.cpu_s()).values())
                for role, spent in _spent(busy0, side.cpu_s()).items():
                    busy_cpu[side.name][role] += spent
                results[side.name] += out
                walls[side.name] += wall
                row[side.name] = round(sum(x["tokens"] for x in out) / wall, 1)
            row["ratio"] = round(row[gateway.name] / row[vllm.name], 3)
            print(f"  c={concurrency} round {r + 1}: {row}", flush=True)
            round_rows.append(row)
        for side in sides:
            summaries[side.name].append(
                summarize(concurrency, results[side.name], walls[side.name])
            )
        # CPU per output token of each side's processes while that side ran, by role: the
        # front end's is what the gateway's extra process hop costs, and on a machine the
        # engine keeps busy it is taken from the engine
        for name, out in results.items():
            tokens = sum(x["tokens"] for x in out)
            summaries[name][-1]["cpu_us_per_output_token"] = {
                role: round(1e6 * spent / tokens, 1)
                for role, spent in busy_cpu[name].items()
                if spent > 0
            }
        details.append(
            {
                "concurrency": concurrency,
                "rounds": round_rows,
                # CPU a side used while it was idle and the other ran, in % of one core
                "idle_cpu_pct": {
                    side.name: round(100 * idle_cpu[side.name] / walls[other.name], 1)
                    for side, other in ((vllm, gateway), (gateway, vllm))
                },
            }
        )
    return summaries, details


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
    url: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    ok: Any = lambda status, body: status == 200,
) -> None:
    """Poll `url` until `ok(status, decoded JSON body or None)`."""
    deadline = time.monotonic() + START_TIMEOUT_S
    async with _session(5) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited {proc.returncode}:\n{_tail(log)}")
            try:
                async with http.get(url) as r:
                    text = await r.text()
                    with contextlib.suppress(ValueError):
                        if ok(r.status, json.loads(text) if text else None):
                            return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(1)


@contextlib.asynccontextmanager
async def vllm_server(folder: str, *, work: Path) -> AsyncIterator[Side]:
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
        yield Side("vLLM server", url, [proc.pid])
    finally:
        stop(proc)


@contextlib.asynccontextmanager
async def gateway_cluster(model: str, *, work: Path) -> AsyncIterator[tuple[Side, str]]:
    """A local etcd and `deepinfer-nb up` serving `model`; the side and the store's URL."""
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
    proc = spawn(cmd, log, NO_POOL)
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
        async with _session(30) as http, http.post(url + "/v1/deployments", json=spec) as r:
            if r.status >= 400:
                raise RuntimeError(f"POST /v1/deployments: {r.status} {await r.text()}")
        await wait_http(
            url + f"/v1/deployments/{SERVED}",
            proc,
            log,
            ok=lambda status, body: status == 200 and body["ready_replicas"] == 1,
        )
        await wait_http(
            url + "/v1/models",
            proc,
            log,
            ok=lambda status, body: any(m["id"] == SERVED for m in body["data"]),
        )
        print("gateway + shim + vLLM ready", flush=True)
        assert etcd.process is not None
        yield Side("gateway", url, [proc.pid, etcd.process.pid]), etcd.url
    finally:
        stop(proc)
        etcd.stop()


async def added_latency(url: str, store_url: str) -> dict[str, Any]:
    """One-token requests in pairs (gateway, shim direct; the order alternates) on the same
    engine, for a chat question and for the smallest completion; per kind the median of the
    per-pair differences and its bootstrap 95% interval."""
    async with open_store(store_url) as store:
        result = await store.range(keys.ENGINES)
    engine = next(
        e
        for kv in result.items
        if (e := decode_record(Engine, kv.key, kv.value)) is not None
        and e.state is EngineState.RUNNING
    )
    question = "What is the capital of France?"
    one_token = pb.SamplingParams(max_tokens=1, temperature=0)
    kinds: dict[str, tuple[str, dict[str, Any], Any]] = {
        "chat": (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": question}]},
            lambda c: c.chat(
                pb.ChatRequest(
                    messages=[pb.ChatMessage(role="user", content=question)], sampling=one_token
                )
            ),
        ),
        "completion": (
            "/v1/completions",
            {"prompt": "Hi"},
            lambda c: c.generate(pb.GenerateRequest(prompt="Hi", sampling=one_token)),
        ),
    }
    out: dict[str, Any] = {}
    async with (
        _session(60) as http,
        EngineClient(engine.endpoint, token=engine.auth_token) as client,
    ):
        for kind, (path, fields, direct) in kinds.items():
            body = {"model": SERVED, "max_tokens": 1, "temperature": 0, **fields}
            out[kind] = await _paired(
                functools.partial(_post, http, url + path, body),
                functools.partial(direct, client),
                LATENCY_PAIRS[kind],
            )
    return out


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    async with http.post(url, json=body) as r:
        r.raise_for_status()
        await r.read()


async def _timed(call: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await call()
    return time.perf_counter() - t0


async def _paired(
    gateway_call: Callable[[], Awaitable[Any]],
    direct_call: Callable[[], Awaitable[Any]],
    pairs: int,
) -> dict[str, Any]:
    via_gateway: list[float] = []
    direct: list[float] = []
    for i in range(pairs + 4):
        if i % 2 == 0:
            g = await _timed(gateway_call)
            d = await _timed(direct_call)
        else:
            d = await _timed(direct_call)
            g = await _timed(gateway_call)
        if i >= 4:  # the first few warm connections and caches
            via_gateway.append(g)
            direct.append(d)
    diffs = [g - d for g, d in zip(via_gateway, direct, strict=True)]
    rng = random.Random(0)
    medians = sorted(percentile(rng.choices(diffs, k=len(diffs)), 50) for _ in range(2000))
    p50_g, p50_d = percentile(via_gateway, 50), percentile(direct, 50)
    return {
        "pairs": len(diffs),
        "added_p50_ms": round(percentile(diffs, 50) * 1e3, 2),
        "added_p50_ci95_ms": [round(percentile(medians, q) * 1e3, 2) for q in (2.5, 97.5)],
        "gateway_p50_ms": round(p50_g * 1e3, 2),
        "shim_direct_p50_ms": round(p50_d * 1e3, 2),
        "difference_of_p50s_ms": round((p50_g - p50_d) * 1e3, 2),
    }


# ---- report ------------------------------------------------------------------------------------


def table(vllm: list[dict[str, Any]], gw: list[dict[str, Any]]) -> str:
    head = (
        "| c | server | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
        "| front-end CPU us/tok |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for v, g in zip(vllm, gw, strict=True):
        for name, x in (("vLLM server", v), ("gateway", g)):
            rows.append(
                f"| {x['concurrency']} | {name} | {x['output_tokens_per_s']} | "
                f"{x['requests_per_s']} | {x['ttft_p50_ms']} | {x['ttft_p99_ms']} | "
                f"{x['itl_p50_ms']} | {_front_end_cpu(x)} |"
            )
        rows.append(
            f"| {v['concurrency']} | gateway / vLLM | "
            f"{g['output_tokens_per_s'] / v['output_tokens_per_s']:.2f}x | "
            f"{g['requests_per_s'] / v['requests_per_s']:.2f}x | "
            f"{g['ttft_p50_ms'] / v['ttft_p50_ms']:.2f}x | "
            f"{g['ttft_p99_ms'] / v['ttft_p99_ms']:.2f}x | "
            f"{g['itl_p50_ms'] / v['itl_p50_ms']:.2f}x | "
            f"{_front_end_cpu(g) / _front_end_cpu(v):.2f}x |"
        )
    return "\n".join(rows)


def _front_end_cpu(summary: dict[str, Any]) -> float:
    return float(summary["cpu_us_per_output_token"]["front end"])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the requests per round (default 1: 2, 16 and 64 at c=1, 16 and 64)",
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="interleaved rounds per level (default 4)"
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
    plan = {c: max(c, round(n * args.scale)) for c, n in LEVELS.items() if c in args.concurrency}
    print(
        f"plan (concurrency: requests per round and side): {plan}, {args.rounds} rounds", flush=True
    )
    async with (
        vllm_server(folder, work=work) as vllm_side,
        gateway_cluster(args.model, work=work) as (gateway_side, store_url),
    ):
        summaries, details = await run_levels(
            vllm_side, gateway_side, plan=plan, rounds=args.rounds
        )
        added = await added_latency(gateway_side.url, store_url)
    vllm, gw = summaries[vllm_side.name], summaries[gateway_side.name]
    report = table(vllm, gw)
    print(report)
    for kind, a in added.items():
        print(
            f"gateway added latency, one-token {kind} ({a['pairs']} pairs): median of pair "
            f"differences {a['added_p50_ms']} ms (95% interval {a['added_p50_ci95_ms']}), "
            f"gateway {a['gateway_p50_ms']} ms vs shim direct {a['shim_direct_p50_ms']} ms"
        )
    out = {
        "benchmark": "serve",
        "model": args.model,
        "engine_flags": f"--enforce-eager --dtype {DTYPE} --max-model-len 2048, "
        "VLLM_CPU_KVCACHE_SPACE=1",
        "output_tokens": OUTPUT_TOKENS,
        "requests_per_round": {str(c): n for c, n in plan.items()},
        "rounds": args.rounds,
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
        "levels": details,
        "added_latency": added,
        "table_markdown": report,
    }
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "serve.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {results / 'serve.json'}")


if __name__ == "__main__":
    asyncio.run(main())
