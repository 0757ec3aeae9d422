"""The shim process's own lifecycle against real vLLM on CPU: a stop while the model loads, and
start-up failures whose last stderr line says what went wrong.

The failure tests are cheap (they fail before or early in the load); the stop test starts one
real engine load and ends it half-way.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from deepinfer_nb._proto import engine_service_pb2 as pb
from deepinfer_nb.control.launcher import group_members
from deepinfer_nb.engine import local_models
from deepinfer_nb.engine.process import (
    CPU_TEST_FLAGS,
    LLAMACPP_TEST_FLAGS,
    ShimProcess,
    shim_command,
    spawn_shim,
)
from deepinfer_nb.errors import EngineTimeoutError, EngineUnavailableError
from deepinfer_nb.netutil import free_port
from tests.fixtures.engine import GGUF_MODEL, MODEL

pytestmark = pytest.mark.engine

STOP_DEADLINE_S = 15.0


async def wait_loading_with_core(shim: ShimProcess, *, timeout: float = 240.0) -> list[int]:
    """Wait until HealthCheck says STARTING and the shim has spawned vLLM's EngineCore; returns
    the pids of the shim's descendants then."""
    deadline = time.monotonic() + timeout
    async with shim.client() as client:
        while time.monotonic() < deadline:
            assert shim.process.poll() is None, f"shim exited early:\n{shim.log_tail()}"
            try:
                status = (await client.health(timeout=2.0)).status
            except (EngineUnavailableError, EngineTimeoutError):
                # Not bound yet, or too busy loading to answer within 2 s on a loaded machine.
                status = pb.SERVING_STATUS_UNSPECIFIED
            assert status != pb.SERVING_STATUS_READY, "loaded before the test could stop it"
            children = psutil.Process(shim.process.pid).children(recursive=True)
            if status == pb.SERVING_STATUS_STARTING and children:
                return [c.pid for c in children]
            await asyncio.sleep(0.2)
    pytest.fail(f"no EngineCore while STARTING after {timeout:.0f}s:\n{shim.log_tail()}")


async def test_sigterm_while_loading_exits_zero_and_leaves_no_process() -> None:
    local_models.build(local_models.CATALOG[MODEL])
    shim = spawn_shim(model=MODEL, token="stop-while-loading")
    try:
        child_pids = await wait_loading_with_core(shim)
        tree = [psutil.Process(shim.process.pid)]
        for pid in child_pids:
            try:
                tree.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        start = time.monotonic()
        os.kill(shim.process.pid, signal.SIGTERM)  # the shim only, as a supervisor would
        try:
            code = await asyncio.to_thread(shim.process.wait, STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_DEADLINE_S:.0f}s after SIGTERM:\n{shim.log_tail()}")
        took = time.monotonic() - start
        _, alive = psutil.wait_procs(tree, timeout=2.0)
        left = alive + group_members(shim.process.pid)
        assert code == 0, shim.log_tail()
        assert not left, f"left behind: {left}\n{shim.log_tail()}"
        # the whole log: vLLM's own traceback of the interrupted load can fill the last 40 lines
        log = shim.log_path.read_text(errors="replace")
        assert "SIGTERM" in log, log
        print(f"exited {took:.1f}s after SIGTERM; {len(child_pids)} engine process(es) ended")
    finally:
        if shim.process.poll() is None:
            shim.kill()


def run_failing_shim(
    *,
    model: str,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float,
    flags: tuple[str, ...] = CPU_TEST_FLAGS,
) -> tuple[int, str, float]:
    """Run a shim that is expected to fail; its exit code, stderr and run time."""
    cmd = shim_command(model=model, port=free_port(), flags=flags, extra=extra)
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    start = time.monotonic()
    done = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=full_env,
        timeout=timeout,
        start_new_session=True,
    )
    stderr = done.stderr.decode(errors="replace")
    return done.returncode, stderr, time.monotonic() - start


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


BACKEND_FLAGS = {"vllm": CPU_TEST_FLAGS, "llama.cpp": LLAMACPP_TEST_FLAGS}


@pytest.mark.parametrize("backend", list(BACKEND_FLAGS))
@pytest.mark.parametrize(
    "model",
    ["/nonexistent/deepinfer-test-model", "./no-such-dir/model", "smollm3-no-such-alias"],
)
def test_missing_model_is_named_on_the_last_line(model: str, backend: str) -> None:
    code, stderr, took = run_failing_shim(model=model, timeout=60, flags=BACKEND_FLAGS[backend])
    line = last_line(stderr)
    assert code != 0
    assert line.startswith("deepinfer-nb engine: model not found:"), stderr[-2000:]
    assert model in line
    assert took < 30, f"took {took:.0f}s: the check should come before vLLM loads"


@pytest.mark.parametrize("backend", list(BACKEND_FLAGS))
def test_bad_engine_arg_gives_a_one_line_cause(backend: str) -> None:
    if backend == "vllm":
        local_models.build(local_models.CATALOG[MODEL])
    code, stderr, _ = run_failing_shim(
        model=MODEL if backend == "vllm" else GGUF_MODEL,
        extra=("--no-such-flag",),
        timeout=120,
        flags=BACKEND_FLAGS[backend],
    )
    line = last_line(stderr)
    assert code == 2
    assert line.startswith("deepinfer-nb engine: bad engine args:"), stderr[-2000:]
    assert "--no-such-flag" in line
    assert "Traceback" not in stderr


def test_impossible_kv_cache_names_memory_from_the_engine_core() -> None:
    local_models.build(local_models.CATALOG[MODEL])
    code, stderr, took = run_failing_shim(
        model=MODEL, env={"VLLM_CPU_KVCACHE_SPACE": "100000"}, timeout=240
    )
    line = last_line(stderr)
    assert code == 1, stderr[-3000:]
    assert line.startswith(f"deepinfer-nb engine: cannot start {MODEL}:"), stderr[-3000:]
    # The cause comes from the EngineCore's own error, not "see above".
    assert "memory" in line.lower() and "kv" in line.lower(), line
    assert "in the engine core" in line, line
    print(f"failed after {took:.0f}s: {line}", file=sys.stderr)
