"""The launcher on real child processes (a fake engine, see tests/fixtures/fake_engine.py):
command line and environment, own session, log file and tail, state file and re-adoption, stop
escalation to the whole process group, and the parent-death signal when the worker is SIGKILLed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from deepinfer_nb.control.launcher import (
    TOKEN_ENV,
    Launcher,
    LogTail,
    build_command,
    build_env,
    group_members,
    leftovers,
)
from deepinfer_nb.models import DeploymentSpec, Engine

CPU_ENGINE = Engine(id="chat-0-abc", deployment="chat", node="n1", device="cpu")


def spec(**kw: object) -> DeploymentSpec:
    return DeploymentSpec(name="chat", model="smollm2-135m-instruct", **kw)  # type: ignore[arg-type]


def wait_until(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def grandchild_of(launcher: Launcher, engine_id: str) -> int:
    proc = launcher.processes[engine_id]
    assert wait_until(lambda: any(ln.startswith("grandchild") for ln in proc.tail.lines(50)))
    line = next(ln for ln in proc.tail.lines(50) if ln.startswith("grandchild"))
    return int(line.split()[1])


# ---- pure --------------------------------------------------------------------------------------


def test_cpu_command_and_env() -> None:
    s = spec(
        max_model_len=2048,
        enforce_eager=True,
        dtype="bfloat16",
        engine_args=["--max-num-seqs", "4"],
    )
    cmd = build_command(CPU_ENGINE, s, python="/py", port=5000, bind_host="127.0.0.1", grace_s=3)
    assert cmd[:3] == ["/py", "-m", "deepinfer_nb.engine"]
    assert cmd[cmd.index("--device") + 1] == "cpu"
    assert cmd[cmd.index("--max-model-len") + 1] == "2048"
    assert cmd[cmd.index("--auth-token-env") + 1] == TOKEN_ENV
    assert "--enforce-eager" in cmd and "--gpu-memory-utilization" not in cmd
    assert cmd[cmd.index("--") + 1 :] == ["--max-num-seqs", "4"]
    env = build_env(CPU_ENGINE, s, token="t0k", base={"PATH": "/bin"})
    assert env[TOKEN_ENV] == "t0k" and env["PATH"] == "/bin"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""


def test_deployment_env_wins_for_kv_cache() -> None:
    env = build_env(CPU_ENGINE, spec(env={"VLLM_CPU_KVCACHE_SPACE": "3"}), token="t", base={})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_cuda_command_pins_gpus() -> None:
    e = CPU_ENGINE.model_copy(update={"device": "cuda", "gpus": [2, 3], "gpu_fraction": 0.45})
    s = spec(tensor_parallel_size=2)
    cmd = build_command(e, s, python="/py", port=1, bind_host="0.0.0.0", grace_s=1)
    assert cmd[cmd.index("--device") + 1] == "cuda"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.45"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert "--" not in cmd
    assert build_env(e, s, token="t", base={})["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_log_tail_prefers_the_engines_own_cause(tmp_path: Path) -> None:
    path = tmp_path / "e.log"
    path.write_text("INFO loading\ndeepinfer-nb engine: cannot start x: out of memory\ntrailing")
    tail = LogTail(path, size=2)
    assert tail.cause() == "cannot start x: out of memory"
    assert tail.lines(2) == ["deepinfer-nb engine: cannot start x: out of memory", "trailing"]
    with path.open("a") as f:
        f.write(" line\nnext\n")
    assert tail.lines(2) == ["trailing line", "next"]
    assert LogTail(tmp_path / "missing.log").cause() == ""


# ---- real processes ----------------------------------------------------------------------------


async def test_launch_logs_state_and_group_stop(tmp_path: Path, fake_python: str) -> None:
    launcher = Launcher(node_id="n1", engine_python=fake_python, home=tmp_path)
    launcher.acquire()
    try:
        proc, token = launcher.launch(
            CPU_ENGINE, spec(env={"FAKE_ENGINE_MODE": "ignore-term"}), advertise_host="127.0.0.1"
        )
        assert len(token) >= 32 and proc.endpoint == f"127.0.0.1:{proc.port}"
        assert os.getsid(proc.pid) == proc.pid  # its own session and process group
        grandchild = grandchild_of(launcher, CPU_ENGINE.id)
        assert os.getpgid(grandchild) == proc.pid
        lines = proc.tail.lines(20)
        assert f"token-length {len(token)}" in lines and "kv-space 1" in lines
        assert lines[0].startswith("--- ") and "launching on node n1" in lines[0]
        state = json.loads(launcher.state_path.read_text())
        assert state[CPU_ENGINE.id]["pid"] == proc.pid
        assert state[CPU_ENGINE.id]["start_time"] == pytest.approx(
            psutil.Process(proc.pid).create_time()
        )

        started = time.monotonic()
        await launcher.stop(proc, token="", grace_s=0.5)  # SIGTERM is ignored: SIGKILL follows
        assert time.monotonic() - started < 5
        assert wait_until(lambda: gone(proc.pid) and gone(grandchild))
        assert not group_members(proc.pid)
        assert proc.exit_description() == "engine process killed by SIGKILL"
        assert json.loads(launcher.state_path.read_text()) == {}
    finally:
        launcher.release()


async def test_restart_readopts_live_and_cleans_dead(tmp_path: Path, fake_python: str) -> None:
    first = Launcher(node_id="n1", engine_python=fake_python, home=tmp_path, die_with_parent=False)
    live, _ = first.launch(CPU_ENGINE, spec(), advertise_host="127.0.0.1")
    dead_engine = CPU_ENGINE.model_copy(update={"id": "chat-1-def"})
    dead, _ = first.launch(dead_engine, spec(), advertise_host="127.0.0.1")
    orphan = grandchild_of(first, dead_engine.id)
    os.kill(dead.pid, signal.SIGKILL)  # the shim dies, its grandchild lingers in the group
    assert wait_until(lambda: not dead.alive())

    second = Launcher(node_id="n1", engine_python=fake_python, home=tmp_path)
    second.acquire()
    try:
        with pytest.raises(Exception, match="another worker for node 'n1'"):
            Launcher(node_id="n1", home=tmp_path).acquire()
        state = second.load_state()
        assert set(state) == {CPU_ENGINE.id, dead_engine.id}
        adopted = second.adopt(CPU_ENGINE.id, state[CPU_ENGINE.id])
        assert adopted is not None and adopted.pid == live.pid and adopted.popen is None
        assert adopted.alive()  # its log is read from the file; the fake writes it soon after start
        assert wait_until(lambda: "token-length" in " ".join(adopted.tail.lines(50)))
        assert second.adopt(dead_engine.id, state[dead_engine.id]) is None
        assert wait_until(lambda: gone(orphan))  # leftovers of the dead engine are killed
        await second.stop(adopted, token="", grace_s=2.0)  # SIGTERM suffices here
        assert wait_until(lambda: gone(live.pid))
        assert adopted.exit_description().startswith("engine process exited (exit status unknown")
    finally:
        second.release()
        for p in (live, dead):
            first.kill(p)
            if p.popen is not None:
                p.popen.wait(timeout=5)


def test_recycled_pid_is_neither_adopted_nor_killed(tmp_path: Path) -> None:
    """Same pid, other start time: another program's process (and group) now; hands off."""
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        forged = {
            "pid": stranger.pid,
            "port": 1,
            "endpoint": "127.0.0.1:1",
            "start_time": psutil.Process(stranger.pid).create_time() - 50,
        }
        assert Launcher(node_id="n2", home=tmp_path).adopt("x", forged) is None
        time.sleep(0.2)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_engines_die_with_their_worker(tmp_path: Path, fake_python: str) -> None:
    """SIGKILL the process that launched an engine: the engine gets SIGTERM and exits."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from deepinfer_nb.control.launcher import Launcher\n"
        "from deepinfer_nb.models import DeploymentSpec, Engine\n"
        f"l = Launcher(node_id='n1', engine_python={fake_python!r}, home=Path({str(tmp_path)!r}))\n"
        "e = Engine(id='chat-0-abc', deployment='chat', node='n1', device='cpu')\n"
        "p, _ = l.launch(e, DeploymentSpec(name='chat', model='m'), advertise_host='127.0.0.1')\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        engine_pid = int(worker.stdout.readline())
        assert not gone(engine_pid)
        engine_start = psutil.Process(engine_pid).create_time()
        worker.kill()
        worker.wait()
        assert wait_until(lambda: gone(engine_pid), timeout=10), "engine outlived its worker"
        # The fake ends its grandchild on SIGTERM as the shim does; anything its group still
        # holds is what a restarted worker's adopt() cleans up (tested above). Kill it here.
        for p in leftovers(engine_pid, engine_start):
            p.kill()
    finally:
        worker.kill()
        worker.wait()
        worker.stdout.close()


async def test_stop_of_an_already_dead_engine_is_quiet(tmp_path: Path, fake_python: str) -> None:
    launcher = Launcher(node_id="n1", engine_python=fake_python, home=tmp_path)
    proc, _ = launcher.launch(
        CPU_ENGINE, spec(env={"FAKE_ENGINE_MODE": "fail"}), advertise_host="127.0.0.1"
    )
    assert proc.popen is not None
    await asyncio.to_thread(proc.popen.wait, 10)
    assert proc.exit_description() == "engine process exited with code 1"
    assert proc.tail.cause() == "cannot start fake: boom"
    await launcher.stop(proc, token="ignored", grace_s=1.0)
    assert CPU_ENGINE.id not in launcher.processes


async def test_stop_signals_at_once_when_the_shim_does_not_take_shutdown(
    tmp_path: Path, fake_python: str
) -> None:
    # A shim not listening yet (still loading) or wedged refuses the Shutdown RPC: nothing is
    # draining then, so the stop signals at once instead of first waiting out the grace.
    launcher = Launcher(node_id="n1", engine_python=fake_python, home=tmp_path)
    proc, token = launcher.launch(CPU_ENGINE, spec(), advertise_host="127.0.0.1")
    try:
        started = time.monotonic()
        await launcher.stop(proc, token=token, grace_s=60.0)
        assert time.monotonic() - started < 30.0  # the grace alone is 60 s
        assert not proc.alive()
    finally:
        launcher.kill(proc)
