"""The launch policy where it matters: on the worker, for specs written straight into a real etcd
(bypassing the gateway and its 422). A `deepinfer-nb worker` process and the controller run
against the session's etcd; the worker's engine Python is the fake engine, so a spec it admits
launches a (fake) process at once and a refused one must show no process at all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from deepinfer_nb.config import SchedulerSettings
from deepinfer_nb.control.controller import Controller
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState, decode
from deepinfer_nb.store import MetaStore, keys

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(300)]

S = EngineState
CLI = str(Path(sys.executable).with_name("deepinfer-nb"))
REFUSED = [
    ("env", {"env": {"LD_PRELOAD": "/tmp/evil.so"}}, "env.never"),
    ("flag", {"engine_args": ["--trust-remote-code"]}, "args.code_loading"),
    ("path", {"model": "/etc"}, "path.outside_model_dirs"),
]


def start_worker(url: str, home: Path, fake_python: str) -> subprocess.Popen[bytes]:
    with (home / "worker.log").open("ab") as log:
        return subprocess.Popen(
            [CLI, "worker", "--store", url, "--node", "pw", "--engine-python", fake_python],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={
                **os.environ,
                "DEEPINFER_HOME": str(home),
                "DEEPINFER_AGENT__HEARTBEAT_TTL_S": "3",
                "DEEPINFER_AGENT__RECONCILE_INTERVAL_S": "0.5",
                "DEEPINFER_AGENT__STOP_GRACE_S": "2",
            },
        )


@pytest.fixture
async def cluster(
    etcd_store: MetaStore, etcd_url: str, tmp_path: Path, fake_python: str
) -> AsyncIterator[tuple[MetaStore, Path]]:
    controller = Controller(
        etcd_store,
        settings=SchedulerSettings(reconcile_interval_s=0.5, restart_backoff_s=0.5, leader_ttl_s=3),
    )
    task = asyncio.create_task(controller.run())
    worker = start_worker(etcd_url, tmp_path, fake_python)
    try:
        yield etcd_store, tmp_path
    finally:
        worker.send_signal(signal.SIGTERM)  # drains: stops the admitted fake engine
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        await controller.stop()
        await asyncio.gather(task, return_exceptions=True)
        await etcd_store.delete_prefix(keys.ROOT)


async def until(
    store: MetaStore, name: str, check: Callable[[Engine], bool], home: Path, timeout: float = 60
) -> Engine:
    deadline = time.monotonic() + timeout
    while True:
        found = [decode(Engine, kv.key, kv.value) for kv in (await store.range(keys.ENGINES)).items]
        mine = [e for e in found if e.deployment == name]
        if mine and check(mine[0]):
            return mine[0]
        if time.monotonic() > deadline:
            worker_log = (home / "worker.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"{name}: {[(e.state, e.reason) for e in mine]}\n{worker_log}")
        await asyncio.sleep(0.2)


async def test_refused_specs_fail_on_the_worker_for_good_without_a_process(
    cluster: tuple[MetaStore, Path],
) -> None:
    store, home = cluster
    # an admitted spec launches at once: this worker can and does start processes
    ok = DeploymentSpec(name="ok", model="m", device="cpu")
    await store.put(keys.deployment("ok"), ok.encode())
    launched = await until(store, "ok", lambda e: e.pid > 0, home)
    assert (home / "logs" / f"{launched.id}.log").exists()

    for name, change, _rule in REFUSED:
        spec = DeploymentSpec(name=name, **{"model": "m", "device": "cpu", **change})
        await store.put(keys.deployment(name), spec.encode())  # straight into etcd
    failed = {
        name: await until(store, name, lambda e: e.state == S.FAILED, home)
        for name, _, _ in REFUSED
    }
    await asyncio.sleep(3)  # several controller rounds (backoff 0.5 s): no restart comes
    for name, _, rule in REFUSED:
        later = await until(store, name, lambda e: True, home)
        assert later.state == S.FAILED and later.permanent, (name, later)
        assert f"(rule {rule})" in later.error and later.reason == later.error
        assert later.restarts == 0 and later.pid == 0 and later.endpoint == ""
        assert later.updated_at == failed[name].updated_at  # untouched since it failed
        assert [t.state for t in later.history][-2:] == [S.STARTING, S.FAILED]
        assert not (home / "logs" / f"{later.id}.log").exists(), name  # nothing was started
        print(f"{name}: {later.error}")
    assert "engine refused" in (home / "worker.log").read_text()
