"""`deepinfer-nb demo`: the offline main job, end to end on this machine.

Builds the local SmolLM2 model (once), starts an engine shim on CPU on a free port, asks it
"What is the capital of France?", streams the answer, prints the measured time to first token
and output tokens/s, and shuts the shim down cleanly (drain, exit 0, no engine process left).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import procenv
from .._proto import engine_service_pb2 as pb
from ..engine import local_models, process
from ..errors import DeepInferError

QUESTION = "What is the capital of France?"
MODEL = "smollm2-135m-instruct"


def register(sub: Any) -> None:
    parser = sub.add_parser("demo", help="build the local model, serve it on CPU, ask a question")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--start-timeout", type=float, default=600.0, help="seconds to wait for the engine to load"
    )
    parser.set_defaults(func=_demo)


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def _demo(args: argparse.Namespace) -> int:
    path = local_models.build(local_models.CATALOG[MODEL], progress=_say)
    _say(f"model ready in {path}")
    log_path = Path(tempfile.mkdtemp(prefix="deepinfer-demo-")) / "engine.log"
    shim = process.spawn_shim(model=MODEL, token=secrets.token_hex(16), log_path=log_path)
    _say(f"starting the engine shim on {shim.endpoint} (log: {log_path})")
    try:
        return procenv.run(_session(args, shim))
    finally:
        if shim.process.poll() is None:  # only after a failure: a clean run has already exited
            shim.kill()


async def _session(args: argparse.Namespace, shim: process.ShimProcess) -> int:
    await _wait_ready(shim, timeout=args.start_timeout)
    async with shim.client() as client:
        # The first forward pass initialises CPU kernels (seconds); keep it out of the numbers.
        await client.chat(_request("Hi", 1))
        _say(f"asking: {args.question}")
        start = time.perf_counter()
        first = 0.0
        tokens = 0
        print(f"Q: {args.question}\nA: ", end="", flush=True)
        async for event in client.chat_stream(_request(args.question, args.max_tokens)):
            for delta in event.deltas:
                if delta.token_ids and not first:
                    first = time.perf_counter() - start
                print(delta.text, end="", flush=True)
            if event.finished:
                tokens = event.usage.completion_tokens
        total = time.perf_counter() - start
        print()
        decode = (tokens - 1) / (total - first) if tokens > 1 and total > first else 0.0
        print(
            f"{tokens} tokens in {total:.2f} s: {tokens / total:.1f} tokens/s overall, "
            f"{decode:.1f} tokens/s after the first token; TTFT {first * 1000:.0f} ms"
        )
        _say("shutting the engine down")
        await client.shutdown(grace_period_s=30)
    code = await asyncio.to_thread(shim.process.wait, 120)
    if code != 0:
        raise DeepInferError(f"the engine exited with {code}; see {shim.log_path}")
    _say("engine stopped cleanly")
    return 0


async def _wait_ready(shim: process.ShimProcess, *, timeout: float) -> None:
    """`process.wait_ready` with a progress line every 5 s of the wait."""
    start = time.monotonic()
    last_note = 0.0

    def note(reply: pb.HealthCheckResponse | None) -> None:
        nonlocal last_note
        waited = time.monotonic() - start
        if waited - last_note >= 5:
            what = reply.message if reply is not None else "process starting"
            _say(f"waiting for the engine ({waited:.0f} s): {what}")
            last_note = waited

    await process.wait_ready(shim, timeout=timeout, progress=note)
    _say(f"engine ready after {time.monotonic() - start:.0f} s")


def _request(question: str, max_tokens: int) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=question)],
        sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens),
    )
