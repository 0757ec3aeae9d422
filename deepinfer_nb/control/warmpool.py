"""The worker's warm pool: engine processes that have already imported torch, vLLM and the
project (and started their forkserver, engine/warmfork.py) and wait for an assignment
(engine/pooled.py), so a deployment only loads its model.

    pool = WarmPool(size=1, python=py, env=lambda: pool_env(os.environ), log_dir=home / "logs")
    await pool.start()
    member = pool.take(launch_env, python=py)   # None: start cold
    member.assign(argv=flags, env=launch_env, log=path)
    await pool.stop()

Who is served: vLLM engines on CPU (`serves`). A llama.cpp engine starts cold in about a second,
and a pooled process's torch and vLLM would be wasted on it; a GPU engine's CUDA_VISIBLE_DEVICES
is read when CUDA starts, which a pooled process must not have decided for it.

A member is taken only when its environment (fixed when its interpreter started: OMP_*,
PYTHON*, LD_*, GRPC_EXPERIMENTS, HF_* read at import, ...) equals the launch's in every variable
but `LATE_ENV` (read by the shim after the assignment): `compatible()`. A deployment with its own
`env` or `secrets` therefore starts cold, which is always correct. When the worker's own
environment changes (a notebook setting `os.environ[...]` after `up`), members started with the
old one are replaced.

Refill: a new member starts once no engine of the node is starting (`busy`), so its imports never
compete with a model load for the CPUs. A member that exits before its assignment is replaced
after a backoff (a Python without vLLM would otherwise be restarted in a loop). Memory:
`status()` sums the resident memory of each member's tree (the process and its forkserver).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from .. import procenv
from ..engine.pooled import READY_LINE, Assignment
from ..engine.process import TOKEN_ENV, kill_group, process_tree, shim_env
from ..models import WarmPoolStatus
from ..procenv import stop_task

__all__ = [
    "LATE_ENV",
    "Member",
    "WarmPool",
    "compatible",
    "differences",
    "pool_env",
    "resolve_size",
    "serves",
]

log = logging.getLogger(__name__)

LATE_ENV = frozenset({TOKEN_ENV})
"""Variables the shim reads only after its assignment: they may differ from the member's."""
POLL_S = 1.0
RETRY_S = (5.0, 30.0, 120.0)
"""Waits before replacing a member that exited unassigned, by how many did so in a row."""
AUTO_CPU_SIZE = 1
"""The pool size `warm_pool = -1` (auto) means on a node without GPUs."""


# ---- pure decisions ------------------------------------------------------------------------


def resolve_size(setting: int, *, gpus: int, has_vllm: bool) -> int:
    """The pool size for `[agent] warm_pool` (-1: auto) on a node with `gpus` GPUs whose engine
    Python `has_vllm`: auto is AUTO_CPU_SIZE without GPUs, else 0; never a pool without vLLM."""
    if not has_vllm:
        return 0
    if setting < 0:
        return AUTO_CPU_SIZE if gpus == 0 else 0
    return setting


def serves(*, backend: str, device: str) -> bool:
    """Whether a pooled process may run this engine (vLLM on CPU; see the module docstring)."""
    return backend == "vllm" and device != "cuda"


def pool_env(base: Mapping[str, str]) -> dict[str, str]:
    """The environment members start with: what `launcher.build_env` gives a CPU engine of a
    deployment without `env` or `secrets`, less the token."""
    return shim_env({**base, "CUDA_VISIBLE_DEVICES": ""}, cpu=True)


def differences(member_env: Mapping[str, str], launch_env: Mapping[str, str]) -> list[str]:
    """The variables (names only: values may be secrets) that keep a member started with
    `member_env` from becoming an engine launched with `launch_env`."""
    keys = (set(member_env) | set(launch_env)) - LATE_ENV
    return sorted(k for k in keys if member_env.get(k) != launch_env.get(k))


def compatible(member_env: Mapping[str, str], launch_env: Mapping[str, str]) -> bool:
    """Whether a member started with `member_env` can become an engine launched with
    `launch_env` (equal but for LATE_ENV)."""
    return not differences(member_env, launch_env)


def retry_delay(failures: int) -> float:
    return RETRY_S[min(failures, len(RETRY_S)) - 1] if failures > 0 else 0.0


# ---- one member ----------------------------------------------------------------------------


@dataclasses.dataclass
class Member:
    """A pooled process: started with `env` by `python`, output in `log_path` until assigned."""

    popen: subprocess.Popen[bytes]
    start_time: float
    env: dict[str, str]
    python: str
    log_path: Path
    _warm: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def warm(self) -> bool:
        """Whether it has finished its imports (its READY_LINE is in its log)."""
        if not self._warm:
            try:
                self._warm = READY_LINE in self.log_path.read_text(errors="replace")
            except OSError:
                pass
        return self._warm

    def rss(self) -> int:
        total = 0
        for p in process_tree(self.pid):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

    def assign(self, *, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        """Hand over the engine: the shim's flags, its full environment and its log file."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(Assignment(argv=argv, env=dict(env), log=str(log)).encode())
        self.popen.stdin.close()

    def kill(self) -> None:
        tree = process_tree(self.pid)
        if self.alive():
            kill_group(self.pid, signal.SIGKILL)
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                continue
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("pooled engine process %d did not exit after SIGKILL", self.pid)


# ---- the pool ------------------------------------------------------------------------------


class WarmPool:
    """Keeps `size` members ready for one node (see the module docstring)."""

    def __init__(
        self,
        *,
        size: int,
        python: str,
        env: Callable[[], Mapping[str, str]],
        log_dir: Path,
        die_with_parent: bool = True,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self.size = size
        self.python = python
        self.env = env
        """What a member starts with now (read again before each start)."""
        self.log_dir = log_dir
        self.die_with_parent = die_with_parent
        self.busy = busy
        self.members: list[Member] = []
        self._failures = 0
        self._not_before = 0.0
        self._spawned = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.size > 0 and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="warm pool")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        members, self.members = self.members, []
        await asyncio.gather(*(asyncio.to_thread(m.kill) for m in members))

    def take(self, launch_env: Mapping[str, str], *, python: str) -> Member | None:
        """A live member that can become this launch (removed from the pool), or None."""
        for member in list(self.members):
            if not member.alive() or member.python != python:
                continue
            differ = differences(member.env, launch_env)
            if not differ:
                self.members.remove(member)
                return member
            log.info(
                "warm engine process %d not used: the engine's environment sets %s "
                "differently (read at interpreter start); starting a new process",
                member.pid,
                ", ".join(differ),
            )
        return None

    def status(self) -> WarmPoolStatus:
        members = [m for m in self.members if m.alive()]
        warm = sum(1 for m in members if m.warm())
        return WarmPoolStatus(
            size=self.size,
            warm=warm,
            starting=len(members) - warm,
            memory_bytes=sum(m.rss() for m in members),
            pids=[m.pid for m in members],
        )

    # ---- filling --------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self._prune()
            if not self.busy():
                env = dict(self.env())
                stale = [m for m in self.members if m.env != env]
                for member in stale:
                    log.info("warm engine process %d replaced: the environment changed", member.pid)
                    self.members.remove(member)
                    await asyncio.to_thread(member.kill)
                if len(self.members) < self.size and time.monotonic() >= self._not_before:
                    self.members.append(self._spawn(env))
            await asyncio.sleep(POLL_S)

    def _prune(self) -> None:
        for member in [m for m in self.members if not m.alive()]:
            self.members.remove(member)
            member.kill()  # reaps it and closes its stdin
            self._failures += 1
            delay = retry_delay(self._failures)
            self._not_before = time.monotonic() + delay
            log.warning(
                "warm engine process %d exited with %s before it was used (log: %s); "
                "replacing it in %.1fs",
                member.pid,
                member.popen.returncode,
                member.log_path,
                delay,
            )
        if any(m.warm() for m in self.members):
            self._failures = 0

    def _spawn(self, env: dict[str, str]) -> Member:
        """Start one member (from the loop's thread: the parent-death signal follows it)."""
        self._spawned += 1
        path = self.log_dir / f"warm-{os.getpid()}-{self._spawned % 4}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-m", "deepinfer_nb.engine", "--pooled"]
        argv = procenv.die_with_parent(cmd, python=self.python) if self.die_with_parent else cmd
        with path.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        try:
            start_time = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:
            start_time = 0.0
        log.info("warm engine process %d starting (log: %s)", popen.pid, path)
        return Member(popen, start_time, env, self.python, path)
