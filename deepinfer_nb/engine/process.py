"""Engine shim processes seen from outside: start one on a free port, wait until it is READY, and
stop it with its whole process tree (shim, vLLM EngineCore, workers).

Used by the test fixtures, the benchmarks and `deepinfer-nb demo` (and the shim itself, for ending
its own children when a stop comes while the model loads). The worker's launcher
(`control/launcher.py`) builds on the pieces here (command line, environment, `popen_shim`, tree
kills, `poll_ready`) and adds the node-level parts: state file, parent-death guard, re-adoption.

    shim = await start_shim(model="smollm2-135m-instruct", token="t", flags=CPU_TEST_FLAGS)
    async with shim.client() as client: ...
    shim.kill()
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import psutil

from .. import procenv
from .._proto import engine_service_pb2 as pb
from ..errors import EngineError, EngineStartError, is_temporary
from ..netutil import free_port
from .client import EngineClient

__all__ = [
    "CPU_TEST_FLAGS",
    "TOKEN_ENV",
    "EngineStartError",
    "ReadyOutcome",
    "ShimProcess",
    "end_processes",
    "kill_group",
    "kill_processes",
    "poll_ready",
    "popen_shim",
    "process_tree",
    "shim_command",
    "shim_env",
    "spawn_shim",
    "start_shim",
    "wait_ready",
]

log = logging.getLogger(__name__)

# The settings that start SmolLM2 on CPU in about 30 s (see DESIGN.md "Models for tests").
CPU_TEST_FLAGS = (
    "--device",
    "cpu",
    "--enforce-eager",
    "--max-model-len",
    "2048",
)
TOKEN_ENV = "DEEPINFER_ENGINE_TOKEN"
"""The variable that hands a shim its auth token (never on the command line: `ps` shows that)."""
READY_POLL_S = 0.5

ReadyOutcome = Literal["ready", "exited", "timeout"]


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


def shim_env(
    base: Mapping[str, str], *, token: str = "", cpu: bool = True, token_env: str = TOKEN_ENV
) -> dict[str, str]:
    """The shim's environment: `base`, the token (if any) under `token_env`, unbuffered output
    (a log file sees lines as they are written), our gRPC settings (`procenv`) and, on CPU, a
    small KV cache."""
    env = dict(base)
    if cpu:
        # vLLM on CPU reserves VLLM_CPU_KVCACHE_SPACE GiB for the KV cache (default 4): keep it
        # small unless `base` says otherwise.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if token:
        env[token_env] = token
    env["PYTHONUNBUFFERED"] = "1"
    env.update(procenv.grpc_env(env))
    return env


def popen_shim(
    argv: Sequence[str], *, env: Mapping[str, str], out: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session (its pid is its process group, so the whole tree can be
    signalled as one), stdout and stderr to `out`, no stdin."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=dict(env),
        start_new_session=True,
        close_fds=True,
    )


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
        return process_tree(self.process.pid)

    def kill(self) -> None:
        """SIGKILL the whole tree and process group (shim, EngineCore, workers); waits."""
        tree = self.tree()
        if self.process.poll() is None:
            # The group id is the shim's pid and stays reserved while the shim (unreaped) lives.
            kill_group(self.process.pid, signal.SIGKILL)
        end_processes(tree, grace_s=0.0)
        self.process.wait(timeout=30)


def process_tree(pid: int) -> list[psutil.Process]:
    """Process `pid` and its descendants, captured while the parent links still stand (empty if
    `pid` is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_group(pgid: int, sig: signal.Signals) -> None:
    """Signal process group `pgid`, whose leader the caller verified alive (pid + start time)
    just now; a group that is already gone is no error. Refuses groups 0 and 1: a test once
    signalled group 1."""
    if pgid <= 1:
        raise ValueError(f"refusing to signal process group {pgid}")
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_processes(processes: Iterable[psutil.Process]) -> None:
    """SIGKILL each of `processes` that still lives, without waiting. psutil re-checks each
    one's start time first, so a recycled pid is never hit."""
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied as exc:
            log.warning("cannot kill process %d: %s", p.pid, exc)


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
    kill_processes(alive)
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
    full_env = shim_env({**os.environ, **(env or {})}, token=token)
    cmd = shim_command(
        model=model, port=port, token_env=TOKEN_ENV if token else "", flags=flags, extra=extra
    )
    with log_path.open("wb") as out:
        proc = popen_shim(cmd, env=full_env, out=out)
    return ShimProcess(f"127.0.0.1:{port}", token, model, proc, log_path)


async def poll_ready(
    client: EngineClient,
    *,
    alive: Callable[[], bool],
    timeout: float,
    interval: float = READY_POLL_S,
    health_timeout: float = 2.0,
    progress: Callable[[pb.HealthCheckResponse | None], None] | None = None,
) -> ReadyOutcome:
    """Poll HealthCheck every `interval` s until READY ("ready"), until `alive()` says the
    process is gone ("exited") or for at most `timeout` s ("timeout"). A temporary error
    (`errors.is_temporary`) means "not listening yet, or too busy loading to answer in time"; a
    permanent one (e.g. a wrong token: another process holds the port) is raised.
    `progress` sees each answer that is not READY (None: no answer). Cancellable."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            return "exited"
        reply: pb.HealthCheckResponse | None = None
        try:
            reply = await client.health(timeout=health_timeout)
        except EngineError as exc:
            if not is_temporary(exc):
                raise
        if reply is not None and reply.status == pb.SERVING_STATUS_READY:
            return "ready"
        if time.monotonic() >= deadline:
            return "timeout"
        if progress is not None:
            progress(reply)
        await asyncio.sleep(interval)


async def wait_ready(
    shim: ShimProcess,
    *,
    timeout: float,
    progress: Callable[[pb.HealthCheckResponse | None], None] | None = None,
) -> None:
    """Poll HealthCheck until READY; EngineStartError if the shim exits or `timeout` passes
    (the shim is left running then: the caller decides whether to kill it)."""
    async with shim.client() as client:
        outcome = await poll_ready(
            client, alive=lambda: shim.process.poll() is None, timeout=timeout, progress=progress
        )
    if outcome == "exited":
        raise EngineStartError(
            f"engine shim exited with {shim.process.returncode} (log: {shim.log_path}):\n"
            f"{shim.log_tail()}"
        )
    if outcome == "timeout":
        raise EngineStartError(
            f"engine shim not READY after {timeout:.0f}s (log: {shim.log_path}):\n{shim.log_tail()}"
        )


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
