"""Every long-running command stops cleanly on SIGTERM as on SIGINT, and what it started dies with
it when it is SIGKILLed: no process of it is left, its ports are free, and the next start on the
same data directory (and ports) succeeds.

Each test runs one command three times on the same DEEPINFER_HOME and ports: SIGTERM the first
(exit status 0), SIGKILL the second, SIGTERM the third. Before each signal the command's whole
process tree is recorded (etcd's server; the worker's engines, which are the fake engine of
tests/fixtures with a grandchild each); after it, every one of those processes must be gone.
Commands that need a shared store use the session's real etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import psutil
import pytest

from deepinfer_nb.config import SchedulerSettings
from deepinfer_nb.control.controller import Controller
from deepinfer_nb.models import DeploymentSpec, Engine, decode
from deepinfer_nb.netutil import bind_socket, free_port
from deepinfer_nb.store import MetaStore, keys
from deepinfer_nb.store.local_etcd import LocalEtcd

pytestmark = pytest.mark.etcd

MAIN = "from deepinfer_nb.cli import main; raise SystemExit(main())"
FAKE_SPEC = {"name": "sig", "model": "m", "device": "cpu", "env": {"FAKE_ENGINE_MODE": "sleep"}}
Ready = Callable[["Command"], Awaitable[None]]


class Command:
    """One `deepinfer-nb ARGS` process with its log; `tree()` is it and all its descendants."""

    def __init__(self, args: list[str], *, home: Path, log: Path) -> None:
        self.log = log
        # FAKE_ENGINE_MODE is the fake engine's switch, no engine tunable: these workers admit it
        env = {
            **os.environ,
            "DEEPINFER_HOME": str(home),
            "DEEPINFER_AGENT__ALLOWED_ENV": "FAKE_ENGINE_MODE",
        }
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", MAIN, *args], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def check_alive(self) -> None:
        assert self.proc.poll() is None, "the command exited early:\n" + self.text()

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]


async def until(what: str, cond: Callable[[], Awaitable[bool]], cmd: Command, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        cmd.check_alive()
        assert time.monotonic() < deadline, f"{what} not within {timeout:g} s:\n" + cmd.text()
        await asyncio.sleep(0.2)


def http_ok(url: str) -> Callable[[], Awaitable[bool]]:
    async def ok() -> bool:
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                return (await client.get(url)).status_code == 200
        except httpx.TransportError:
            return False

    return ok


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def signal_and_check(
    cmd: Command, sig: signal.Signals, *, ports: list[int], min_tree: int
) -> None:
    """Send `sig`, then: SIGTERM exits 0; every process of the tree is gone; the ports are free."""
    tree = cmd.tree()
    assert len(tree) >= min_tree, f"expected {min_tree} processes, saw {tree}:\n" + cmd.text()
    cmd.proc.send_signal(sig)
    code = await asyncio.to_thread(cmd.proc.wait, 60)
    if sig == signal.SIGTERM:
        assert code == 0, cmd.text()
    else:
        assert code == -signal.SIGKILL
    deadline = time.monotonic() + 15
    while not all(gone(p) for p in tree):
        left = [p for p in tree if not gone(p)]
        assert time.monotonic() < deadline, f"left behind after {sig.name}: {left}\n" + cmd.text()
        await asyncio.sleep(0.1)
    for port in ports:
        bind_socket("127.0.0.1", port, what="a test socket").close()


async def three_lives(
    args: list[str], *, tmp_path: Path, ready: Ready, ports: list[int], min_tree: int = 1
) -> None:
    home = tmp_path / "home"
    for n, sig in enumerate((signal.SIGTERM, signal.SIGKILL, signal.SIGTERM)):
        cmd = Command(args, home=home, log=tmp_path / f"run{n}.log")
        try:
            await ready(cmd)
            await signal_and_check(cmd, sig, ports=ports, min_tree=min_tree)
        finally:
            if cmd.proc.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    for p in cmd.tree():
                        p.kill()
                cmd.proc.wait(10)


async def test_etcd(tmp_path: Path) -> None:
    port, peer = free_port(), free_port()

    async def ready(cmd: Command) -> None:
        await until("etcd healthy", http_ok(f"http://127.0.0.1:{port}/health"), cmd)

    await three_lives(
        ["etcd", "--port", str(port), "--peer-port", str(peer)],
        tmp_path=tmp_path,
        ready=ready,
        ports=[port, peer],
        min_tree=2,  # the command and its etcd server
    )
    assert (tmp_path / "home" / "etcd" / "member").is_dir()  # the one data directory, reused


async def test_up(tmp_path: Path, fake_python: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    async def ready(cmd: Command) -> None:
        await until("gateway up", http_ok(url + "/health"), cmd)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.post("/v1/deployments", json=FAKE_SPEC)).status_code == 201

            async def launched() -> bool:
                engines = (await client.get("/v1/engines")).json()["data"]
                return bool(engines) and engines[0]["pid"] > 0

            await until("engine launched", launched, cmd)
        await until("engine grandchild", _tree_at_least(cmd, 3), cmd)

    await three_lives(
        ["up", "--node", "sig", "--gateway-port", str(port), "--engine-python", fake_python],
        tmp_path=tmp_path,
        ready=ready,
        ports=[port],
        min_tree=3,  # up, the engine (guard, then the shim), its grandchild
    )


async def test_serve(tmp_path: Path, etcd_server: LocalEtcd, etcd_store: MetaStore) -> None:
    port = free_port()

    async def ready(cmd: Command) -> None:
        await until("gateway up", http_ok(f"http://127.0.0.1:{port}/health"), cmd)

    await three_lives(
        ["serve", "--store", etcd_server.url, "--gateway-port", str(port)],
        tmp_path=tmp_path,
        ready=ready,
        ports=[port],
    )


async def test_gateway(tmp_path: Path, etcd_server: LocalEtcd, etcd_store: MetaStore) -> None:
    port = free_port()

    async def ready(cmd: Command) -> None:
        await until("gateway up", http_ok(f"http://127.0.0.1:{port}/health"), cmd)

    await three_lives(
        ["gateway", "--store", etcd_server.url, "--port", str(port)],
        tmp_path=tmp_path,
        ready=ready,
        ports=[port],
    )


async def test_controller(tmp_path: Path, etcd_server: LocalEtcd, etcd_store: MetaStore) -> None:
    async def ready(cmd: Command) -> None:
        async def leads() -> bool:
            kv = await etcd_store.get(keys.leader("controller"))
            return kv is not None and f":{cmd.proc.pid}:".encode() in kv.value

        # after a SIGKILL the old leader key lives out its 2 s lease; then this one leads
        await until("controller leads", leads, cmd)

    await three_lives(
        ["controller", "--store", etcd_server.url, "--leader-ttl", "2"],
        tmp_path=tmp_path,
        ready=ready,
        ports=[],
    )


async def test_worker(
    tmp_path: Path, etcd_server: LocalEtcd, etcd_store: MetaStore, fake_python: str
) -> None:
    async def ready(cmd: Command) -> None:
        async def launched() -> bool:
            live = [
                e
                for kv in (await etcd_store.range(keys.ENGINES)).items
                if keys.name_of(kv.key, keys.ENGINES)
                and (e := decode(Engine, kv.key, kv.value)).pid > 0
                and psutil.pid_exists(e.pid)
            ]
            return bool(live)

        await until("engine launched", launched, cmd)
        await until("engine grandchild", _tree_at_least(cmd, 3), cmd)

    async with _controller(etcd_store):
        spec = DeploymentSpec(**FAKE_SPEC)
        await etcd_store.put(keys.deployment(spec.name), spec.encode())
        await three_lives(
            ["worker", "--store", etcd_server.url, "--node", "sig", "--engine-python", fake_python],
            tmp_path=tmp_path,
            ready=ready,
            ports=[],
            min_tree=3,
        )


def _tree_at_least(cmd: Command, n: int) -> Callable[[], Awaitable[bool]]:
    async def enough() -> bool:
        return len(cmd.tree()) >= n

    return enough


@contextlib.asynccontextmanager
async def _controller(store: MetaStore) -> AsyncIterator[None]:
    """A real controller in the test's loop (it places the deployment on the worker's node)."""
    controller = Controller(store, settings=SchedulerSettings(reconcile_interval_s=0.3))
    task = asyncio.create_task(controller.run())
    try:
        yield
    finally:
        await controller.stop()
        await asyncio.gather(task, return_exceptions=True)
