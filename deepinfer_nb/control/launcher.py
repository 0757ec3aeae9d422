"""Engine processes on one node: launch, follow, stop, and remember them across worker restarts.

`Launcher.launch()` starts `python -m deepinfer_nb.engine ...` in its own session (so the shim and
the vLLM EngineCore it spawns form one process group), on a free port, with the assigned devices
(`CUDA_VISIBLE_DEVICES`, or `--device cpu`) and a random auth token handed over in an environment
variable. Output goes straight to `home/logs/{engine_id}.log` (not a pipe: an engine must not get
EPIPE if its worker goes away, and a re-adopted engine keeps logging); `LogTail` keeps the last
lines of it in memory for `logs`.

On Linux each engine gets a parent-death signal (prctl PR_SET_PDEATHSIG = SIGTERM, set by a tiny
`python -c` guard that then execs the shim): when the worker dies, even by SIGKILL, its engines
drain and exit instead of running on as orphans. The signal follows the *thread* that forked, so
launch from the thread that runs the worker's loop.

`stop()` asks politely (Shutdown RPC), then SIGTERMs, then SIGKILLs the whole process group and
every process of the tree. `home/state/{node}.json` lists the launched engines (pid and process
start time, which together survive pid reuse) so a restarted worker re-adopts live ones and
cleans up after dead ones; `home/state/{node}.lock` keeps two workers of one node apart.

The shim's command line, environment defaults, session start and tree kills come from
`engine/process.py`; this module adds what a node needs on top (devices, state file, guard,
start-time checks before signalling anything).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import filelock
import psutil

from .. import config, procenv
from ..defaults import effective
from ..engine.policy import redact_args
from ..engine.process import (
    TOKEN_ENV,
    kill_group,
    kill_processes,
    popen_shim,
    process_tree,
    shim_command,
    shim_env,
)
from ..errors import ConfigError, EngineError
from ..models import DeploymentSpec, Engine
from ..netutil import free_port
from .warmpool import Member, WarmPool, serves

__all__ = ["TOKEN_ENV", "EngineProcess", "Launcher", "LogTail", "build_command", "build_env"]

log = logging.getLogger(__name__)

ENGINE_PREFIX = "deepinfer-nb engine:"
"""How the shim starts its one-line start-up failure message."""
START_TIME_TOLERANCE_S = 0.5
RING_LINES = 1000
MAX_CATCH_UP_BYTES = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ---- the command line and environment (pure) ----------------------------------------------------


def build_command(
    engine: Engine,
    spec: DeploymentSpec,
    *,
    python: str,
    port: int,
    bind_host: str,
    grace_s: float,
    model_path: str = "",
) -> list[str]:
    """The shim's argv for one engine placed by the scheduler; `model_path` (a downloaded
    snapshot) replaces `spec.model` as what the engine loads."""
    settings = effective(spec, "cuda" if engine.device == "cuda" else "cpu")
    flags = [
        "--backend",
        spec.backend,
        "--served-model-name",
        spec.model_name,
        "--dtype",
        spec.dtype,
        "--tensor-parallel-size",
        str(spec.tensor_parallel_size),
        "--grace-period",
        f"{grace_s:g}",
    ]
    if settings.max_model_len:
        flags += ["--max-model-len", str(settings.max_model_len)]
    if engine.device == "cuda" and spec.backend == "llama.cpp":
        flags += ["--device", "cuda"]  # llama.cpp takes no memory fraction
    elif engine.device == "cuda":
        # CUDA_VISIBLE_DEVICES carries the assigned GPUs; `cuda:N` would override it.
        fraction = engine.gpu_fraction or spec.gpu_memory_utilization
        flags += ["--device", "cuda", "--gpu-memory-utilization", f"{fraction:g}"]
    else:
        flags += ["--device", "cpu"]
    if settings.enforce_eager and spec.backend == "vllm":
        flags.append("--enforce-eager")
    if spec.task != "auto":
        flags += ["--task", spec.task]
    if spec.tool_call_parser != "auto":
        flags += ["--tool-call-parser", spec.tool_call_parser]
    return shim_command(
        model=model_path or spec.model,
        port=port,
        host=bind_host,
        token_env=TOKEN_ENV,
        flags=flags,
        extra=spec.engine_args,
        python=python,
    )


def build_env(
    engine: Engine,
    spec: DeploymentSpec,
    *,
    token: str,
    base: Mapping[str, str],
    secrets: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The engine's environment: ours, the deployment's `env`, its resolved `secrets`, devices,
    token."""
    cuda = engine.device == "cuda"
    devices = ",".join(str(g) for g in engine.gpus) if cuda else ""
    return shim_env(
        {**base, **spec.env, **(secrets or {}), "CUDA_VISIBLE_DEVICES": devices},
        token=token,
        cpu=not cuda,
    )


# ---- output ------------------------------------------------------------------------------------


class LogTail:
    """The last lines of a log file, read on demand (nothing is lost: the file has it all)."""

    def __init__(self, path: Path, *, offset: int = 0, size: int = RING_LINES) -> None:
        self.path = path
        self._offset = offset
        self._partial = b""
        self._lines: collections.deque[str] = collections.deque(maxlen=size)

    def lines(self, n: int = 100) -> list[str]:
        self._catch_up()
        tail = list(self._lines)
        if self._partial:
            tail.append(self._partial.decode(errors="replace"))
        return tail[-n:] if n > 0 else []

    def _catch_up(self) -> None:
        try:
            with self.path.open("rb") as f:
                end = f.seek(0, os.SEEK_END)
                if end < self._offset:  # truncated by someone: start over
                    self._offset, self._partial = 0, b""
                start = max(self._offset, end - MAX_CATCH_UP_BYTES)
                f.seek(start)
                data = f.read(end - start)
        except FileNotFoundError:
            return
        self._offset = start + len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        self._lines.extend(line.decode(errors="replace").rstrip("\r") for line in complete)

    def cause(self) -> str:
        """The engine's own one-line failure message if it printed one, else its last line."""
        lines = [ln.strip() for ln in self.lines(RING_LINES) if ln.strip()]
        for line in reversed(lines):
            if line.startswith(ENGINE_PREFIX):
                return line[len(ENGINE_PREFIX) :].strip()
        return lines[-1] if lines else ""


# ---- one engine process ------------------------------------------------------------------------


@dataclasses.dataclass
class EngineProcess:
    """A launched (or re-adopted) engine shim; `popen` is None when re-adopted."""

    engine_id: str
    pid: int
    start_time: float
    port: int
    endpoint: str
    log_path: Path
    tail: LogTail
    popen: subprocess.Popen[bytes] | None = None
    launched_at: float = dataclasses.field(default_factory=time.time)
    pooled: bool = False
    """Taken from the warm pool (started before its assignment) rather than started for it."""

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _same_process(self.pid, self.start_time)

    def exit_code(self) -> int | None:
        """The exit status (None: running, or adopted so unknown)."""
        return self.popen.poll() if self.popen is not None else None

    def exit_description(self) -> str:
        """How the process ended, for the Failed reason."""
        code = self.popen.poll() if self.popen is not None else None
        if code is None:
            return "engine process exited (exit status unknown: adopted after a worker restart)"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"engine process killed by {name}"
        return f"engine process exited with code {code}"

    def state_entry(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "port": self.port,
            "endpoint": self.endpoint,
            "log_path": str(self.log_path),
            "launched_at": self.launched_at,
        }


def _same_process(pid: int, start_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return (
            abs(p.create_time() - start_time) < START_TIME_TOLERANCE_S
            and p.status() != psutil.STATUS_ZOMBIE
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def group_members(pgid: int) -> list[psutil.Process]:
    """Every live process in process group `pgid` (a group id is not reused while it has
    members, so these are the engine's own leftovers)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


# ---- the launcher ------------------------------------------------------------------------------


class Launcher:
    """Starts, stops and remembers the engine processes of node `node_id` on this host."""

    def __init__(
        self,
        *,
        node_id: str,
        engine_python: str = "",
        home: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.node_id = node_id
        self.python = engine_python or sys.executable
        self.home = home or config.home_dir()
        self.log_dir = self.home / "logs"
        self.state_path = self.home / "state" / f"{node_id}.json"
        self._lock = filelock.FileLock(str(self.home / "state" / f"{node_id}.lock"))
        self.die_with_parent = die_with_parent
        self.processes: dict[str, EngineProcess] = {}

    # -- node-level bookkeeping

    def acquire(self) -> None:
        """Claim this node's state on this host (one worker per node name per host)."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise ConfigError(
                f"another worker for node {self.node_id!r} is running on this "
                f"host (it holds {self._lock.lock_file})"
            ) from None

    def release(self) -> None:
        self._lock.release()

    def load_state(self) -> dict[str, dict[str, Any]]:
        """The engines a previous worker of this node launched (empty if none or unreadable)."""
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.state_path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def save_state(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({eid: p.state_entry() for eid, p in self.processes.items()}, indent=1)
        )
        tmp.replace(self.state_path)  # atomic: a crash never leaves half a file

    def forget(self, engine_id: str) -> None:
        if self.processes.pop(engine_id, None) is not None:
            self.save_state()

    def log_path(self, engine_id: str) -> Path:
        return self.log_dir / f"{engine_id}.log"

    # -- launch and adopt

    def launch(
        self,
        engine: Engine,
        spec: DeploymentSpec,
        *,
        advertise_host: str,
        grace_s: float = 10.0,
        model_path: str = "",
        secret_env: Mapping[str, str] | None = None,
        pool: WarmPool | None = None,
    ) -> tuple[EngineProcess, str]:
        """Start the shim for `engine` (loading `model_path` if given, else `spec.model`, with
        `secret_env` added to its environment); returns the process and its auth token. A
        compatible member of `pool` becomes the shim when there is one (same command line and
        environment, handed over instead of exec'd), else a new process starts."""
        bind_host = advertise_host if advertise_host in LOOPBACK else "0.0.0.0"
        port = free_port(bind_host if bind_host != "0.0.0.0" else "")
        token = secrets.token_urlsafe(32)
        cmd = build_command(
            engine,
            spec,
            python=self.python,
            port=port,
            bind_host=bind_host,
            grace_s=grace_s,
            model_path=model_path,
        )
        env = build_env(engine, spec, token=token, base=os.environ, secrets=secret_env)
        path = self.log_path(engine.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        member = None
        if pool is not None and serves(backend=spec.backend, device=engine.device):
            member = pool.take(env, python=self.python)
        how = f" (warm process {member.pid})" if member is not None else ""
        with path.open("ab") as out:
            offset = out.tell()
            out.write(
                f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} launching on node "
                f"{self.node_id}{how}: {' '.join(redact_args(cmd))}\n".encode()
            )
            out.flush()
            if member is not None and not _hand_over(member, cmd=cmd, env=env, path=path):
                member = None
            if member is None:
                argv = procenv.die_with_parent(cmd, python=cmd[0]) if self.die_with_parent else cmd
                popen = popen_shim(argv, env=env, out=out)
        if member is not None:
            popen, start_time = member.popen, member.start_time
        else:
            try:
                start_time = psutil.Process(popen.pid).create_time()
            except psutil.NoSuchProcess:  # exited at once; the monitor reports how
                start_time = 0.0
        proc = EngineProcess(
            engine_id=engine.id,
            pid=popen.pid,
            start_time=start_time,
            port=port,
            endpoint=f"{advertise_host}:{port}",
            log_path=path,
            tail=LogTail(path, offset=offset),
            popen=popen,
            pooled=member is not None,
        )
        self.processes[engine.id] = proc
        self.save_state()
        return proc, token

    def adopt(self, engine_id: str, entry: Mapping[str, Any]) -> EngineProcess | None:
        """Take over a live engine from the state file; None (and its leftovers killed) if the
        process is gone or the pid now belongs to someone else."""
        try:
            pid, start_time = int(entry["pid"]), float(entry["start_time"])
            port, endpoint = int(entry["port"]), str(entry["endpoint"])
        except (KeyError, TypeError, ValueError):
            return None
        path = Path(str(entry.get("log_path") or self.log_path(engine_id)))
        if not _same_process(pid, start_time):
            kill_processes(leftovers(pid, start_time))  # a dead shim may have left its EngineCore
            return None
        size = path.stat().st_size if path.exists() else 0
        proc = EngineProcess(
            engine_id=engine_id,
            pid=pid,
            start_time=start_time,
            port=port,
            endpoint=endpoint,
            log_path=path,
            tail=LogTail(path, offset=max(0, size - 64 * 1024)),
            launched_at=float(entry.get("launched_at") or 0.0),
        )
        self.processes[engine_id] = proc
        self.save_state()
        return proc

    # -- stop

    async def stop(self, proc: EngineProcess, *, token: str, grace_s: float) -> None:
        """Shutdown RPC, then SIGTERM, then SIGKILL to the group and tree; forgets `proc`."""
        tree = _tree(proc)
        if proc.alive() and token and await _request_shutdown(proc, token=token, grace_s=grace_s):
            await _wait_exit(proc, grace_s + 2.0)
        if proc.alive():
            kill_group(proc.pid, signal.SIGTERM)
            await _wait_exit(proc, grace_s)
        await self.terminate(proc, tree=tree)

    async def terminate(
        self, proc: EngineProcess, *, tree: list[psutil.Process] | None = None
    ) -> None:
        """SIGKILL whatever is left of the engine, wait for it, forget it."""
        self.kill(proc, tree=tree)
        if not await _wait_exit(proc, 5.0):
            log.warning("engine process %d did not exit after SIGKILL", proc.pid)
        self.forget(proc.engine_id)

    def kill(self, proc: EngineProcess, *, tree: list[psutil.Process] | None = None) -> None:
        """SIGKILL whatever is left of the engine: its process group and its known tree."""
        members = (tree if tree is not None else _tree(proc)) + leftovers(proc.pid, proc.start_time)
        if proc.alive():
            kill_group(proc.pid, signal.SIGKILL)
        kill_processes(members)


def _hand_over(member: Member, *, cmd: list[str], env: Mapping[str, str], path: Path) -> bool:
    """Give the launch to a pool member (cmd is [python, -m, deepinfer_nb.engine, flags...]:
    it runs the flags); False if it died after the pool looked."""
    try:
        member.assign(argv=cmd[3:], env=env, log=path)
    except OSError as exc:
        log.warning("warm engine process %d is gone (%s); starting a new one", member.pid, exc)
        member.kill()
        return False
    return True


def leftovers(pid: int, start_time: float) -> list[psutil.Process]:
    """What remains of the engine whose shim was `pid`: its process group's members, but only
    while `pid` is still that shim or no process at all. Linux never hands out a pid that is
    still some group's id, so an empty slot means the group's members are the shim's own; a
    live process with another start time means the pid (and group id) was recycled and the
    group belongs to someone else."""
    if pid <= 1:
        return []
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - start_time) >= START_TIME_TOLERANCE_S:
            return []
    except psutil.NoSuchProcess:
        pass
    except psutil.AccessDenied:
        return []
    return group_members(pid)


def _tree(proc: EngineProcess) -> list[psutil.Process]:
    """The engine's process and descendants while it is (verifiably) the engine."""
    return process_tree(proc.pid) if proc.alive() else []


async def _request_shutdown(proc: EngineProcess, *, token: str, grace_s: float) -> bool:
    """Ask the shim to drain and exit; False if it did not take the request (not listening
    yet, or wedged): then nothing is draining, and waiting out the grace would only delay the
    signal."""
    from ..engine.client import EngineClient

    try:
        async with EngineClient(proc.endpoint, token=token) as client:
            await asyncio.wait_for(client.shutdown(grace_period_s=grace_s), timeout=5.0)
    except (EngineError, TimeoutError) as exc:
        log.info("engine %s: Shutdown RPC failed (%s); signalling instead", proc.engine_id, exc)
        return False
    return True


async def _wait_exit(proc: EngineProcess, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.alive():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)
    return True
