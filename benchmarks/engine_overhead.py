"""What the gRPC shim costs: the shim process vs vLLM's AsyncLLM driven directly in one process.

Same model (the local SmolLM2 on CPU unless --model), same engine settings, same chat prompts,
128 output tokens per request (ignore_eos, greedy), at concurrency 1 and 16. For each side:
output tokens/s (all output tokens / wall time of the round) and time to first token p50/p99.
The direct engine runs first and is shut down before the shim starts, so they never share CPUs.
Prints a table and writes benchmarks/results/engine_overhead.json.

    .venv/bin/python benchmarks/engine_overhead.py [--model M] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepinfer_nb._proto import engine_service_pb2 as pb  # noqa: E402
from deepinfer_nb.engine import local_models  # noqa: E402
from deepinfer_nb.engine.cpu_dtype import best_cpu_dtype  # noqa: E402
from deepinfer_nb.engine.process import CPU_TEST_FLAGS, start_shim  # noqa: E402

OUTPUT_TOKENS = 128
PROMPTS = [f"Write a long story about a lighthouse keeper, chapter {i}." for i in range(64)]
DTYPE = best_cpu_dtype()  # what the shim picks for --dtype auto on CPU
ENGINE_FLAGS = [*CPU_TEST_FLAGS, "--dtype", DTYPE]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarise(ttfts: list[float], tokens: int, wall: float) -> dict[str, float]:
    return {
        "output_tokens_per_s": tokens / wall,
        "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
        "requests": len(ttfts),
        "output_tokens": tokens,
        "wall_s": wall,
    }


async def run_rounds(one: Any, *, concurrency: int, rounds: int) -> dict[str, float]:
    """`one(prompt) -> (ttft_s, output_tokens)`; `rounds` batches of `concurrency` requests."""
    ttfts: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for r in range(rounds):
        batch = PROMPTS[r * concurrency : (r + 1) * concurrency]
        for ttft, n in await asyncio.gather(*(one(p) for p in batch)):
            ttfts.append(ttft)
            tokens += n
    return summarise(ttfts, tokens, time.perf_counter() - start)


async def bench_direct(model_path: str, rounds: int) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(model=model_path, dtype=DTYPE, max_model_len=2048, enforce_eager=True)
    )
    tokenizer = engine.get_tokenizer()

    async def one(prompt: str) -> tuple[float, int]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        params = SamplingParams(
            max_tokens=OUTPUT_TOKENS,
            temperature=0,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )
        start, ttft, n = time.perf_counter(), 0.0, 0
        async for out in engine.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
            got = sum(len(o.token_ids) for o in out.outputs)
            if got and not ttft:
                ttft = time.perf_counter() - start
            n += got
        return ttft, n

    try:
        await one("warm up")
        return {
            "c1": await run_rounds(one, concurrency=1, rounds=rounds),
            "c16": await run_rounds(one, concurrency=16, rounds=rounds),
        }
    finally:
        engine.shutdown()


async def bench_shim(model: str, rounds: int) -> dict[str, Any]:
    shim = await start_shim(model=model, token="bench", flags=ENGINE_FLAGS)
    try:
        async with shim.client() as client:

            async def one(prompt: str) -> tuple[float, int]:
                req = pb.ChatRequest(
                    messages=[pb.ChatMessage(role="user", content=prompt)],
                    sampling=pb.SamplingParams(
                        max_tokens=OUTPUT_TOKENS, temperature=0, ignore_eos=True
                    ),
                )
                start, ttft, n = time.perf_counter(), 0.0, 0
                async for event in client.chat_stream(req):
                    got = sum(len(d.token_ids) for d in event.deltas)
                    if got and not ttft:
                        ttft = time.perf_counter() - start
                    n += got
                return ttft, n

            await one("warm up")
            return {
                "c1": await run_rounds(one, concurrency=1, rounds=rounds),
                "c16": await run_rounds(one, concurrency=16, rounds=rounds),
            }
    finally:
        shim.kill()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="batches per concurrency level (c=1: requests; c=16: 16 each)",
    )
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "engine_overhead.json")
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = "smollm2-135m-instruct"
    path = str(local_models.build(local_models.CATALOG[model]))
    direct = asyncio.run(bench_direct(path, args.rounds))
    shim = asyncio.run(bench_shim(model, args.rounds))
    result: dict[str, Any] = {
        "model": model,
        "output_tokens": OUTPUT_TOKENS,
        "rounds": args.rounds,
        "engine_flags": ENGINE_FLAGS,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "direct": direct,
        "shim": shim,
        "ratio": {},
    }
    print(f"{'':6}{'side':8}{'tok/s':>10}{'TTFT p50 ms':>14}{'TTFT p99 ms':>14}")
    for level in ("c1", "c16"):
        d, s = direct[level], shim[level]
        for side, row in (("direct", d), ("shim", s)):
            print(
                f"{level:6}{side:8}{row['output_tokens_per_s']:10.1f}"
                f"{row['ttft_p50_ms']:14.1f}{row['ttft_p99_ms']:14.1f}"
            )
        ratio = {
            "throughput": s["output_tokens_per_s"] / d["output_tokens_per_s"],
            "ttft_p50_delta_ms": s["ttft_p50_ms"] - d["ttft_p50_ms"],
        }
        result["ratio"][level] = ratio
        print(f"{level:6}{'ratio':8}{ratio['throughput']:10.3f}{ratio['ttft_p50_delta_ms']:+14.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
