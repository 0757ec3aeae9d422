"""Engine shim processes seen from outside: start one on a free port, wait until it is READY, and
stop it with its whole process tree (shim, vLLM EngineCore, workers).

Used by the test fixtures and the benchmarks (and the shim itself, for ending its own children
when a stop comes while the model loads). The worker's launcher (`control/launcher.py`) adds the
node-level parts on top of the same ideas: state file, parent-death guard, re-adoption.

    shim = await start_shim(model="smollm2-135m-instruct", token="t", flags=CPU_TEST_FLAGS)
    async with shim.client() as client: ...
    shim.kill()
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from .._proto import engine_service_pb2 as pb
from ..errors import EngineError, EngineTimeoutError, EngineUnavailableError
from ..netutil import free_port
from .client import EngineClient

__all__ = [
    "CPU_TEST_FLAGS",
    "EngineStartError",
    "ShimProcess",
    "end_processes",
    "shim_command",
    "spawn_shim",
    "start_shim",
    "wait_ready",
]

# The settings that start SmolLM2 on CPU in about 30 s (see DESIGN.md "Models for tests").
CPU_TEST_FLAGS = (
    "--device",
    "cpu",
    "--enforce-eager",
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "2048",
)
TOKEN_ENV = "DEEPINFER_SHIM_TOKEN"
READY_POLL_S = 0.5


class EngineStartError(EngineError):
    """A shim exited or did not become READY in time; the message carries its log's tail."""


def shim_command(
    *,
    model: str,
    port: int,
    host: str = "127.0.0.1",
    token_env: str = "",
    flags: Sequence[str] = (),
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """argv of `python -m deepinfer_nb.engine`; `extra` are vLLM engine args (after `--`)."""
    cmd = [python, "-m", "deepinfer_nb.engine", "--model", model, "--port", str(port)]
    cmd += ["--host", host, *flags]
    if token_env:
        cmd += ["--auth-token-env", token_env]
    return cmd + (["--", *extra] if extra else [])


@dataclasses.dataclass
class ShimProcess:
    """A shim started by `spawn_shim`, in its own session (its pid is its process group)."""

    endpoint: str
    token: str
    model: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self, **kwargs: Any) -> EngineClient:
        kwargs.setdefault("token", self.token)
        return EngineClient(self.endpoint, **kwargs)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def tree(self) -> list[psutil.Process]:
        """The shim and its live descendants (empty once the shim is gone)."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the whole tree and process group (shim, EngineCore, workers); waits."""
        tree = self.tree()
        if self.process.poll() is None:
            # The group id is the shim's pid and stays reserved while the shim (unreaped) lives.
            os.killpg(self.process.pid, signal.SIGKILL)
        end_processes(tree, grace_s=0.0)
        self.process.wait(timeout=30)


def end_processes(processes: Sequence[psutil.Process], *, grace_s: float) -> list[psutil.Process]:
    """SIGTERM `processes` (SIGKILL at once when `grace_s` is 0), SIGKILL whoever is left after
    `grace_s`; returns those still alive after that (normally none)."""
    for p in processes:
        # multiprocessing's resource tracker ignores SIGTERM: waiting for it is time lost.
        gentle = grace_s > 0 and not _ignores_sigterm(p.pid)
        try:
            p.send_signal(signal.SIGTERM if gentle else signal.SIGKILL)  # checks create time
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s or 5.0)
    for p in alive:
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return psutil.wait_procs(alive, timeout=5.0)[1] if alive else []


def _ignores_sigterm(pid: int) -> bool:
    """Linux: whether the process has SIGTERM set to SIG_IGN (its SigIgn mask)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def spawn_shim(
    *,
    model: str,
    token: str = "",
    flags: Sequence[str] = CPU_TEST_FLAGS,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
) -> ShimProcess:
    """Start a shim on a free loopback port in its own session; output (stdout and stderr)
    goes to `log_path` (a new temp file by default). Returns at once; see `wait_ready`."""
    port = free_port()
    log_path = log_path or Path(tempfile.mkdtemp(prefix="deepinfer-shim-")) / "shim.log"
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    full_env["PYTHONUNBUFFERED"] = "1"
    if token:
        full_env[TOKEN_ENV] = token
    cmd = shim_command(
        model=model, port=port, token_env=TOKEN_ENV if token else "", flags=flags, extra=extra
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,  # so the whole tree can be signalled as one group
        )
    return ShimProcess(f"127.0.0.1:{port}", token, model, proc, log_path)


async def wait_ready(shim: ShimProcess, *, timeout: float) -> None:
    """Poll HealthCheck until READY; EngineStartError if the shim exits or `timeout` passes
    (the shim is left running then: the caller decides whether to kill it)."""
    deadline = time.monotonic() + timeout
    async with shim.client() as client:
        while True:
            if shim.process.poll() is not None:
                raise EngineStartError(
                    f"engine shim exited with {shim.process.returncode}:\n{shim.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise EngineStartError(
                    f"engine shim not READY after {timeout:.0f}s:\n{shim.log_tail()}"
                )
            try:
                if (await client.health(timeout=2.0)).status == pb.SERVING_STATUS_READY:
                    return
            except (EngineUnavailableError, EngineTimeoutError):
                pass  # not bound yet, or too busy loading to answer in time
            await asyncio.sleep(READY_POLL_S)


async def start_shim(
    *,
    model: str,
    token: str = "",
    flags: Sequence[str] = CPU_TEST_FLAGS,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 420.0,
) -> ShimProcess:
    """`spawn_shim` + `wait_ready`; on failure the tree is killed and EngineStartError raised."""
    shim = spawn_shim(model=model, token=token, flags=flags, extra=extra, env=env)
    try:
        await wait_ready(shim, timeout=timeout)
    except BaseException:
        shim.kill()
        raise
    return shim
