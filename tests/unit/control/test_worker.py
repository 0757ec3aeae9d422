"""The worker agent on the memory store with fake engine processes (no vLLM): the pure local
decision table, registration under a lease, claim -> Starting with pid/endpoint/token, start
failures and start timeouts -> Failed with the cause and a backoff, Stopping -> Stopped with the
process gone, and drain on stop. The real-engine paths are in tests/integration/control/."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psutil
import pytest

from deepinfer_nb.config import Settings
from deepinfer_nb.control.worker import LocalAction, Worker, decide_local
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState, GpuSamples, Node
from deepinfer_nb.store import MetaStore, decode_record, keys, open_store

S = EngineState
A = LocalAction


def rec(state: EngineState, node: str = "n1") -> Engine:
    return Engine(id="d-0-x", deployment="d", node=node, state=state)


@pytest.mark.parametrize(
    ("record", "has_local", "action"),
    [
        (None, False, A.NOTHING),
        (None, True, A.KILL),
        (rec(S.SCHEDULED, node="n2"), True, A.KILL),
        (rec(S.RUNNING, node="n2"), False, A.NOTHING),
        (rec(S.PENDING), False, A.NOTHING),
        (rec(S.SCHEDULED), False, A.START),
        (rec(S.SCHEDULED), True, A.NOTHING),
        (rec(S.STARTING), True, A.NOTHING),
        (rec(S.RUNNING), True, A.NOTHING),
        (rec(S.STARTING), False, A.MARK_GONE),
        (rec(S.RUNNING), False, A.MARK_GONE),
        (rec(S.STOPPING), True, A.STOP),
        (rec(S.STOPPING), False, A.STOP),
        (rec(S.LOST), True, A.KILL),
        (rec(S.FAILED), True, A.KILL),
        (rec(S.STOPPED), True, A.KILL),
        (rec(S.FAILED), False, A.NOTHING),
    ],
)
def test_decide_local(record: Engine | None, has_local: bool, action: LocalAction) -> None:
    assert decide_local(record, node_id="n1", has_local=has_local) == action


# ---- a worker on the memory store ---------------------------------------------------------------


@pytest.fixture
async def store() -> AsyncIterator[MetaStore]:
    s = open_store("memory://")
    yield s
    await s.close()


def settings(**agent: float) -> Settings:
    st = Settings()
    st.agent.heartbeat_ttl_s = 2
    st.agent.gpu_sample_interval_s = 0.2
    st.agent.reconcile_interval_s = 0.3
    st.agent.stop_grace_s = 1.0
    st.agent.start_timeout_s = 60.0
    st.agent.allowed_env = ["FAKE_ENGINE_MODE"]  # the fake engine's switch, no vLLM tunable
    for k, v in agent.items():
        setattr(st.agent, k, v)
    st.scheduler.restart_backoff_s = 4.0
    return st


async def engine(store: MetaStore, eid: str) -> Engine:
    kv = await store.get(keys.engine(eid))
    assert kv is not None
    record = decode_record(Engine, kv.key, kv.value)
    assert record is not None
    return record


async def until(
    store: MetaStore, eid: str, pred: Callable[[Engine], bool], timeout: float = 15.0
) -> Engine:
    deadline = time.monotonic() + timeout
    while True:
        e = await engine(store, eid)
        if pred(e):
            return e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; engine is {e.state.value}: {e.reason}")
        await asyncio.sleep(0.1)


async def schedule(store: MetaStore, *, mode: str, eid: str = "d-0-x") -> None:
    spec = DeploymentSpec(name="d", model="m", device="cpu", env={"FAKE_ENGINE_MODE": mode})
    await store.put(keys.deployment("d"), spec.encode())
    e = Engine(id=eid, deployment="d", node="n1", device="cpu", restarts=1)
    await store.put(keys.engine(eid), e.transition(S.SCHEDULED, "placed").encode())


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_registers_node_and_samples_under_a_lease(store: MetaStore, tmp_path: Path) -> None:
    worker = Worker(
        store, node_id="n1", settings=settings(), home=tmp_path, advertise_host="127.0.0.1"
    )
    await worker.start()
    try:
        kv = await store.get(keys.node("n1"))
        assert kv is not None and kv.lease != 0
        node = decode_record(Node, kv.key, kv.value)
        assert node is not None and node.cpu_count > 0 and node.memory_total > 0
        assert node.gpus == [] and node.gpu_error  # a CPU node says why it has no GPU
        first = await store.get(keys.node_gpus("n1"))
        assert first is not None and first.lease == kv.lease
        await asyncio.sleep(0.5)
        later = await store.get(keys.node_gpus("n1"))
        assert later is not None and later.mod_revision > first.mod_revision  # fresh samples
        assert decode_record(GpuSamples, later.key, later.value) is not None
    finally:
        await worker.stop()
    assert await store.get(keys.node("n1")) is None  # drained: lease revoked
    assert await store.get(keys.node_gpus("n1")) is None


async def test_start_failure_is_recorded_with_cause_and_backoff(
    store: MetaStore, tmp_path: Path, fake_python: str
) -> None:
    worker = Worker(
        store, node_id="n1", settings=settings(), home=tmp_path, engine_python=fake_python
    )
    await worker.start()
    try:
        await schedule(store, mode="fail")
        failed = await until(store, "d-0-x", lambda e: e.state == S.FAILED)
        assert failed.error == (
            "engine process exited with code 1; last output: cannot start fake: boom"
        )
        assert failed.reason == failed.error
        # restarts=1 -> backoff 4 * 2**1 = 8 s
        assert failed.next_restart_at == pytest.approx(time.time() + 8, abs=2)
        states = [t.state for t in failed.history]
        assert states[-3:] == [S.SCHEDULED, S.STARTING, S.FAILED]
        assert failed.pid > 0 and not alive(failed.pid)
        assert any("cannot start fake: boom" in ln for ln in worker.logs("d-0-x"))
        assert worker.engines == {}
    finally:
        await worker.stop()


async def test_claim_then_stop_and_start_timeout(
    store: MetaStore, tmp_path: Path, fake_python: str
) -> None:
    worker = Worker(
        store,
        node_id="n1",
        settings=settings(start_timeout_s=3.0),
        home=tmp_path,
        engine_python=fake_python,
    )
    await worker.start()
    try:
        # A fake that never answers HealthCheck: claimed, launched, then times out.
        await schedule(store, mode="sleep")
        starting = await until(store, "d-0-x", lambda e: e.state == S.STARTING and e.pid > 0)
        assert starting.endpoint.startswith("127.0.0.1:") and len(starting.auth_token) >= 32
        assert starting.pid_start_time == pytest.approx(psutil.Process(starting.pid).create_time())
        assert "d-0-x" in worker.engines
        failed = await until(store, "d-0-x", lambda e: e.state == S.FAILED)
        assert failed.error.startswith("not ready after 3s (start timeout)")
        assert not alive(starting.pid)

        # Claimed and starting, then asked to stop: process gone, record Stopped.
        await schedule(store, mode="sleep", eid="d-1-y")
        second = await until(store, "d-1-y", lambda e: e.state == S.STARTING and e.pid > 0)
        kv = await store.get(keys.engine("d-1-y"))
        assert kv is not None
        assert (
            await store.compare_and_swap(
                kv, second.transition(S.STOPPING, "deployment deleted").encode()
            )
        ).succeeded
        stopped = await until(store, "d-1-y", lambda e: e.state == S.STOPPED)
        assert stopped.reason == "stopped by node n1"
        assert not alive(second.pid) and worker.engines == {}
    finally:
        await worker.stop()


async def test_stop_drains_engines(store: MetaStore, tmp_path: Path, fake_python: str) -> None:
    worker = Worker(
        store, node_id="n1", settings=settings(), home=tmp_path, engine_python=fake_python
    )
    await worker.start()
    await schedule(store, mode="sleep")
    starting = await until(store, "d-0-x", lambda e: e.state == S.STARTING and e.pid > 0)
    await worker.stop()
    assert not alive(starting.pid)
    assert await store.get(keys.node("n1")) is None
    assert not (tmp_path / "state" / "n1.json").read_text().strip("{}\n ")


async def test_restarted_worker_readopts_live_engines_and_fails_dead_ones(
    store: MetaStore, tmp_path: Path, fake_python: str
) -> None:
    first = Worker(
        store, node_id="n1", settings=settings(), home=tmp_path, engine_python=fake_python
    )
    await first.start()
    await schedule(store, mode="sleep", eid="d-0-x")
    await schedule(store, mode="sleep", eid="d-1-y")
    live = await until(store, "d-0-x", lambda e: e.state == S.STARTING and e.pid > 0)
    doomed = await until(store, "d-1-y", lambda e: e.state == S.STARTING and e.pid > 0)
    await first.stop(stop_engines=False)  # e.g. the worker is restarted
    assert alive(live.pid) and alive(doomed.pid)
    dying = psutil.Process(doomed.pid)
    dying.kill()  # and one engine dies while no worker watches
    dying.wait(timeout=5)  # SIGKILL is not instant

    second = Worker(
        store, node_id="n1", settings=settings(), home=tmp_path, engine_python=fake_python
    )
    await second.start()
    try:
        assert set(second.engines) == {"d-0-x"} and second.engines["d-0-x"].popen is None
        gone = await until(store, "d-1-y", lambda e: e.state == S.FAILED)
        assert gone.error.startswith("engine process is gone")
        await asyncio.sleep(1.0)
        still = await engine(store, "d-0-x")
        assert still.state == S.STARTING and still.pid == live.pid  # adopted, not restarted
        assert any("token-length" in ln for ln in second.logs("d-0-x"))
    finally:
        await second.stop()
    assert not alive(live.pid)


async def test_a_failure_after_a_long_run_starts_the_restart_count_afresh(
    store: MetaStore, tmp_path: Path
) -> None:
    # Two Running engines whose processes are gone when the worker starts: one had run for an
    # hour (a rare crash: count back to 0), one for seconds (a crash loop: the count stands).
    spec = DeploymentSpec(name="d", model="m", device="cpu", max_restarts=5)
    await store.put(keys.deployment("d"), spec.encode())
    now = time.time()
    for eid, ran_s in (("d-0-long", 3600.0), ("d-1-short", 5.0)):
        e = Engine(id=eid, deployment="d", node="n1", device="cpu", restarts=4, pid=1 << 22)
        running = e.transition(S.RUNNING, "ready").model_copy(update={"started_at": now - ran_s})
        await store.put(keys.engine(eid), running.encode())
    worker = Worker(store, node_id="n1", settings=settings(), home=tmp_path)
    await worker.start()
    try:
        long_run = await until(store, "d-0-long", lambda e: e.state == S.FAILED)
        short_run = await until(store, "d-1-short", lambda e: e.state == S.FAILED)
    finally:
        await worker.stop()
    assert long_run.restarts == 0
    assert long_run.next_restart_at == pytest.approx(now + 4, abs=2)  # backoff 4 * 2**0
    assert short_run.restarts == 4
    assert short_run.next_restart_at == pytest.approx(now + 60, abs=2)  # capped at 60 s


async def test_refused_spec_fails_for_good_without_a_process(
    store: MetaStore, tmp_path: Path, fake_python: str
) -> None:
    """Whatever wrote the spec (here: straight into the store), the worker checks it."""
    worker = Worker(
        store, node_id="n1", settings=settings(), home=tmp_path, engine_python=fake_python
    )
    await worker.start()
    try:
        spec = DeploymentSpec(name="d", model="m", device="cpu", env={"LD_PRELOAD": "/tmp/x.so"})
        await store.put(keys.deployment("d"), spec.encode())
        e = Engine(id="d-0-x", deployment="d", node="n1", device="cpu")
        await store.put(keys.engine("d-0-x"), e.transition(S.SCHEDULED, "placed").encode())
        failed = await until(store, "d-0-x", lambda e: e.state == S.FAILED)
        assert "rule env.never" in failed.error and "LD_PRELOAD" in failed.error
        assert failed.permanent and failed.restarts == 0 and failed.pid == 0
        assert failed.next_restart_at == 0.0
        assert worker.launcher.processes == {}
        assert not worker.launcher.log_path("d-0-x").exists()  # nothing was ever started
    finally:
        await worker.stop()


async def test_secrets_resolved_by_the_worker_and_redacted(
    store: MetaStore, tmp_path: Path, fake_python: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_TOKEN comes from the worker's secrets file, reaches the engine, is never stored, and
    an engine that prints it has it redacted from the recorded cause."""
    token = "hf_abcdefghijklmnopqrstuvwxyz123456"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    secrets_file = tmp_path / "secrets.env"
    secrets_file.write_text(f"# worker secrets\nHF_TOKEN={token}\n")
    st = settings()
    st.agent.secrets_file = str(secrets_file)
    worker = Worker(store, node_id="n1", settings=st, home=tmp_path, engine_python=fake_python)
    await worker.start()
    try:
        spec = DeploymentSpec(
            name="d",
            model="m",
            device="cpu",
            env={"FAKE_ENGINE_MODE": "fail"},
            secrets=["HF_TOKEN"],
        )
        await store.put(keys.deployment("d"), spec.encode())
        e = Engine(id="d-0-x", deployment="d", node="n1", device="cpu")
        await store.put(keys.engine("d-0-x"), e.transition(S.SCHEDULED, "placed").encode())
        failed = await until(store, "d-0-x", lambda e: e.state == S.FAILED)
        assert failed.error.endswith("cannot start fake: boom (token ***)"), failed.error
        assert not failed.permanent
        assert "hf-token set" in worker.launcher.log_path("d-0-x").read_text()
        everything = b"".join(kv.value for kv in (await store.range(keys.ROOT)).items)
        assert token.encode() not in everything
    finally:
        await worker.stop()
    # a worker without the secret refuses the spec, saying where to put it
    worker = Worker(store, node_id="n1", settings=settings(), home=tmp_path / "w2")
    await worker.start()
    try:
        e = Engine(id="d-0-y", deployment="d", node="n1", device="cpu")
        await store.put(keys.engine("d-0-y"), e.transition(S.SCHEDULED, "placed").encode())
        failed = await until(store, "d-0-y", lambda e: e.state == S.FAILED)
        assert "rule secrets.missing" in failed.error and failed.permanent
    finally:
        await worker.stop()
