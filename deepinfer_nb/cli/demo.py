"""`deepinfer-nb demo`: the offline main job, end to end on this machine.

Builds the local SmolLM2 model (once), starts an engine shim on CPU on a free port, asks it
"What is the capital of France?", streams the answer, prints the measured time to first token
and output tokens/s, and shuts the shim down cleanly (drain, exit 0, no engine process left).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .._proto import engine_service_pb2 as pb
from ..engine import local_models
from ..engine.client import EngineClient
from ..errors import DeepInferError, EngineUnavailableError
from ..netutil import free_port

QUESTION = "What is the capital of France?"
MODEL = "smollm2-135m-instruct"
TOKEN_ENV = "DEEPINFER_DEMO_ENGINE_TOKEN"


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
    port, token = free_port(), secrets.token_hex(16)
    log_path = Path(tempfile.mkdtemp(prefix="deepinfer-demo-")) / "engine.log"
    cmd = [
        sys.executable,
        "-m",
        "deepinfer_nb.engine",
        "--model",
        MODEL,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--enforce-eager",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "2048",
        "--auth-token-env",
        TOKEN_ENV,
    ]
    env = {**os.environ, TOKEN_ENV: token}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    _say(f"starting the engine shim on 127.0.0.1:{port} (log: {log_path})")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        return asyncio.run(_session(args, proc, f"127.0.0.1:{port}", token, log_path))
    finally:
        if proc.poll() is None:  # only after a failure: a clean run has already exited
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _session(
    args: argparse.Namespace,
    proc: subprocess.Popen[bytes],
    endpoint: str,
    token: str,
    log_path: Path,
) -> int:
    async with EngineClient(endpoint, token=token) as client:
        await _wait_ready(client, proc, log_path, timeout=args.start_timeout)
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
    code = await asyncio.to_thread(proc.wait, 120)
    if code != 0:
        raise DeepInferError(f"the engine exited with {code}; see {log_path}")
    _say("engine stopped cleanly")
    return 0


async def _wait_ready(
    client: EngineClient, proc: subprocess.Popen[bytes], log_path: Path, *, timeout: float
) -> None:
    start = time.monotonic()
    last_note = 0.0
    while True:
        waited = time.monotonic() - start
        if proc.poll() is not None:
            tail = _last_lines(log_path, 1)
            raise DeepInferError(
                f"the engine exited with {proc.returncode}: "
                f"{tail[0] if tail else ''} (log: {log_path})"
            )
        if waited > timeout:
            raise DeepInferError(
                f"the engine did not load within {timeout:.0f} s (log: {log_path})"
            )
        try:
            health = await client.health(timeout=2.0)
            if health.status == pb.SERVING_STATUS_READY:
                _say(f"engine ready after {waited:.0f} s")
                return
            note = health.message
        except EngineUnavailableError:
            note = "process starting"
        if waited - last_note >= 5:
            _say(f"waiting for the engine ({waited:.0f} s): {note}")
            last_note = waited
        await asyncio.sleep(0.5)


def _last_lines(path: Path, count: int) -> list[str]:
    return path.read_text(errors="replace").strip().splitlines()[-count:]


def _request(question: str, max_tokens: int) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=question)],
        sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens),
    )
