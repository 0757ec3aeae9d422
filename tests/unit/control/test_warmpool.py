"""The warm pool's decisions (pure) and its bookkeeping, with a fake pooled process: a tiny
Python script that says it is warm, reads its assignment and writes it to the named log."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from deepinfer_nb.control import warmpool
from deepinfer_nb.control.launcher import Launcher, _hand_over
from deepinfer_nb.control.warmpool import WarmPool, compatible, differences, resolve_size
from deepinfer_nb.engine.pooled import READY_LINE
from deepinfer_nb.engine.process import TOKEN_ENV
from deepinfer_nb.models import DeploymentSpec, Engine

FAKE_POOLED = f"""
import json, os, sys, time
if os.environ.get("FAKE_POOL_MODE") == "die":
    sys.exit(3)
print({READY_LINE!r}, flush=True)
line = sys.stdin.readline()
if not line:
    sys.exit(0)
data = json.loads(line)
with open(data["log"], "w") as f:
    json.dump(data, f)
time.sleep(60)
"""


# ---- pure decisions ------------------------------------------------------------------------


def test_auto_size_is_one_on_a_node_without_gpus_and_none_with_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(warmpool, "AUTO_CPU_SIZE", 1)  # tests/conftest.py sets 0 for the suite
    assert resolve_size(-1, gpus=0, has_vllm=True) == 1
    assert resolve_size(-1, gpus=2, has_vllm=True) == 0
    assert resolve_size(3, gpus=2, has_vllm=True) == 3
    assert resolve_size(0, gpus=0, has_vllm=True) == 0
    assert resolve_size(2, gpus=0, has_vllm=False) == 0


def test_only_vllm_on_cpu_is_served() -> None:
    assert warmpool.serves(backend="vllm", device="cpu")
    assert not warmpool.serves(backend="vllm", device="cuda")
    assert not warmpool.serves(backend="llama.cpp", device="cpu")


def test_the_token_may_differ_but_nothing_read_at_interpreter_start() -> None:
    member = {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    assert compatible(member, {**member, TOKEN_ENV: "secret"})
    launch = {**member, "OMP_NUM_THREADS": "1", "HF_TOKEN": "hf_x"}
    assert not compatible(member, launch)
    assert differences(member, launch) == ["HF_TOKEN", "OMP_NUM_THREADS"]  # names, never values


def test_pool_env_is_a_cpu_engine_environment_without_a_token() -> None:
    env = warmpool.pool_env({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"})
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert TOKEN_ENV not in env


def test_retry_waits_grow_with_failures_in_a_row() -> None:
    assert warmpool.retry_delay(0) == 0
    assert warmpool.retry_delay(1) < warmpool.retry_delay(2) < warmpool.retry_delay(9)


# ---- the pool with fake members ------------------------------------------------------------


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    script = tmp_path / "fake_pooled.py"
    script.write_text(FAKE_POOLED)
    path = tmp_path / "python"
    # called as `python -m deepinfer_nb.engine --pooled`
    path.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {script} "$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def environ() -> dict[str, str]:
    """The worker's environment as the pool reads it (tests change it in place)."""
    return {"PATH": "/usr/bin:/bin", "MARK": "1"}


@pytest.fixture
async def pool(
    tmp_path: Path, fake_python: str, environ: dict[str, str]
) -> AsyncIterator[WarmPool]:
    p = WarmPool(
        size=1, python=fake_python, env=lambda: environ, log_dir=tmp_path, die_with_parent=False
    )
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_member_becomes_warm_is_taken_with_its_assignment_and_replaced(
    pool: WarmPool, tmp_path: Path
) -> None:
    await until(lambda: pool.status().warm == 1)
    status = pool.status()
    assert status.size == 1 and status.starting == 0 and status.memory_bytes > 0
    env = {**pool.env(), TOKEN_ENV: "t"}
    assert pool.take({**env, "OMP_NUM_THREADS": "9"}, python=pool.python) is None
    assert pool.take(env, python="/other/python") is None
    member = pool.take(env, python=pool.python)
    assert member is not None and member.pid == status.pids[0]
    log = tmp_path / "engine.log"
    member.assign(argv=["--model", "m", "--port", "1"], env=env, log=log)
    await until(log.exists)
    await until(lambda: bool(log.read_text()))
    assert json.loads(log.read_text()) == {
        "argv": ["--model", "m", "--port", "1"],
        "env": env,
        "log": str(log),
    }
    await until(lambda: pool.status().warm == 1)  # refilled
    assert pool.status().pids != [member.pid]
    member.kill()


async def test_no_refill_while_an_engine_is_starting(pool: WarmPool) -> None:
    await until(lambda: pool.status().warm == 1)
    starting = True
    pool.busy = lambda: starting
    member = pool.take(dict(pool.env()), python=pool.python)
    assert member is not None
    await asyncio.sleep(warmpool.POLL_S * 2.5)
    assert pool.members == []
    starting = False
    await until(lambda: len(pool.members) == 1)
    member.kill()


async def test_members_started_with_an_old_environment_are_replaced(
    pool: WarmPool, environ: dict[str, str]
) -> None:
    await until(lambda: pool.status().warm == 1)
    (old,) = pool.status().pids
    environ["MARK"] = "2"
    await until(lambda: pool.status().warm == 1 and pool.status().pids != [old])
    assert pool.members[0].env["MARK"] == "2"


async def test_a_member_that_dies_unassigned_is_replaced_after_a_backoff(
    pool: WarmPool, environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warmpool, "RETRY_S", (0.5, 0.5))
    environ["FAKE_POOL_MODE"] = "die"
    await until(lambda: pool._failures >= 2)
    assert pool.status().warm == 0
    del environ["FAKE_POOL_MODE"]
    await until(lambda: pool.status().warm == 1)


async def test_stop_ends_every_member(pool: WarmPool) -> None:
    await until(lambda: pool.status().warm == 1)
    (member,) = pool.members
    await pool.stop()
    assert member.popen.returncode is not None
    assert pool.members == []


async def test_a_launch_hands_its_command_and_environment_to_a_member(
    fake_python: str, tmp_path: Path
) -> None:
    pool = WarmPool(
        size=1,
        python=fake_python,
        env=lambda: warmpool.pool_env(os.environ),
        log_dir=tmp_path,
        die_with_parent=False,
    )
    launcher = Launcher(node_id="n1", engine_python=fake_python, home=tmp_path)
    launcher.die_with_parent = False
    engine = Engine(id="chat-0-abc", deployment="chat", node="n1", device="cpu")
    model = DeploymentSpec(name="chat", model="smollm2-135m-instruct")
    await pool.start()
    try:
        await until(lambda: pool.status().warm == 1)
        (member,) = pool.status().pids
        proc, token = launcher.launch(engine, model, advertise_host="127.0.0.1", pool=pool)
        assert proc.pooled and proc.pid == member
        await until(lambda: proc.log_path.read_text().startswith("{"))  # the fake writes it
        handed = json.loads(proc.log_path.read_text())
        assert handed["argv"][:2] == ["--model", "smollm2-135m-instruct"]
        assert "--auth-token-env" in handed["argv"] and handed["env"][TOKEN_ENV] == token
        await launcher.terminate(proc)

        # its own env is read at interpreter start: a new process
        tuned = model.model_copy(update={"env": {"OMP_NUM_THREADS": "1"}})
        cold, _ = launcher.launch(engine, tuned, advertise_host="127.0.0.1", pool=pool)
        assert not cold.pooled and cold.pid not in pool.status().pids
        await launcher.terminate(cold)
    finally:
        await pool.stop()


async def test_a_member_that_died_after_take_is_not_handed_the_launch(pool: WarmPool) -> None:
    await until(lambda: pool.status().warm == 1)
    member = pool.take(dict(pool.env()), python=pool.python)
    assert member is not None
    member.popen.kill()  # as if it crashed: its stdin pipe is still open here
    member.popen.wait()
    assert not _hand_over(member, cmd=["py", "-m", "x", "--model", "m"], env={}, path=Path("x"))
