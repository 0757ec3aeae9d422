"""Worker agents for real: a real etcd, two `deepinfer-nb worker` processes, the controller
(in-process) and real engines (SmolLM2 on CPU), in one chain of scenarios that shares the cluster
to keep engine starts to four:

1. deploy -> Running; a chat over the recorded endpoint with the recorded token answers;
2. SIGKILL of the engine process -> Failed (cause recorded) -> restarted -> Running, restarts 1;
3. replicas = 2 -> one engine on each worker;
4. SIGKILL of a worker -> its lease expires -> its engine is Lost and runs again on the other
   worker; the killed worker's engine processes do not outlive it;
5. delete -> every engine process gone, each record Stopped and then removed;
6. a deployment that cannot fit (cuda on CPU-only nodes) stays Pending with the NoFit reason.

The tests run in file order and each builds on the previous one's cluster state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psutil
import pytest

from deepinfer_nb._proto import engine_service_pb2 as pb
from deepinfer_nb.config import SchedulerSettings
from deepinfer_nb.control.controller import Controller
from deepinfer_nb.control.launcher import leftovers
from deepinfer_nb.engine import local_models
from deepinfer_nb.engine.client import EngineClient
from deepinfer_nb.errors import AuthenticationError
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState, decode
from deepinfer_nb.store import EventType, MetaStore, keys, open_store

# An engine start takes ~30-60 s on two idle cores but several minutes when other engines share
# them: the waits (and the per-test timeout) leave room for that.
pytestmark = [pytest.mark.etcd, pytest.mark.engine, pytest.mark.timeout(1200)]

S = EngineState
TTL = 3
START_S = 540.0  # an engine start on two busy cores, with margin
CLI = str(Path(sys.executable).with_name("deepinfer-nb"))
WORKER_ENV = {
    "DEEPINFER_AGENT__HEARTBEAT_TTL_S": str(TTL),
    "DEEPINFER_AGENT__RECONCILE_INTERVAL_S": "1",
    "DEEPINFER_AGENT__HEALTH_CHECK_INTERVAL_S": "1",
    "DEEPINFER_AGENT__GPU_SAMPLE_INTERVAL_S": "2",
    "DEEPINFER_AGENT__STOP_GRACE_S": "5",
    "DEEPINFER_AGENT__START_TIMEOUT_S": str(int(START_S)),
    "DEEPINFER_SCHEDULER__RESTART_BACKOFF_S": "1",
    # the workers' own homes are temporary; the model they serve is in this user's models cache
    "DEEPINFER_AGENT__MODEL_DIRS": str(local_models.models_dir()),
}


@dataclasses.dataclass
class Cluster:
    store: MetaStore
    url: str
    home: Path
    workers: dict[str, subprocess.Popen[bytes]]
    controller: Controller
    model: str
    seen_pids: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    def start_worker(self, node: str) -> None:
        with (self.home / f"worker-{node}.log").open("ab") as log:  # the child keeps its copy
            self.workers[node] = subprocess.Popen(
                [CLI, "worker", "--store", self.url, "--node", node, "--log-format", "json"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **WORKER_ENV, "DEEPINFER_HOME": str(self.home)},
            )

    def worker_log(self, node: str) -> str:
        lines = (self.home / f"worker-{node}.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-30:])


async def engines(store: MetaStore, deployment: str = "") -> list[Engine]:
    items = (await store.range(keys.ENGINES)).items
    found = [decode(Engine, kv.key, kv.value) for kv in items]
    return sorted(
        (e for e in found if not deployment or e.deployment == deployment), key=lambda e: e.replica
    )


async def until(
    cluster: Cluster,
    check: Callable[[list[Engine]], bool],
    *,
    timeout: float,
    deployment: str = "chat",
) -> list[Engine]:
    deadline = time.monotonic() + timeout
    while True:
        found = await engines(cluster.store, deployment)
        if check(found):
            return found
        if time.monotonic() > deadline:
            states = [(e.id, e.state.value, e.node, e.reason) for e in found]
            logs = "\n".join(f"--- {n}\n{cluster.worker_log(n)}" for n in cluster.workers)
            raise AssertionError(f"timed out after {timeout}s; engines: {states}\n{logs}")
        await asyncio.sleep(0.2)


def running(n: int) -> Callable[[list[Engine]], bool]:
    return lambda es: len(es) == n and all(e.state == S.RUNNING for e in es)


def dead(pid: int, start_time: float) -> bool:
    """The process and everything left in its process group are gone."""
    try:
        p = psutil.Process(pid)
        alive = abs(p.create_time() - start_time) < 0.5 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    return not alive and not leftovers(pid, start_time)


async def gone_within(pids: list[tuple[int, float]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not all(dead(p, t) for p, t in pids):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def chat(engine: Engine, text: str) -> str:
    async with EngineClient(engine.endpoint, token=engine.auth_token) as client:
        reply = await client.chat(
            pb.ChatRequest(
                messages=[pb.ChatMessage(role="user", content=text)],
                sampling=pb.SamplingParams(max_tokens=12, temperature=0.0),
            ),
            timeout=120,
        )
    return reply.choices[0].text


async def put_deployment(store: MetaStore, spec: DeploymentSpec) -> None:
    await store.put(keys.deployment(spec.name), spec.encode())


@pytest.fixture(scope="module")
async def cluster(
    etcd_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Cluster]:
    store = open_store(etcd_url)
    await store.delete_prefix(keys.ROOT)
    controller = Controller(
        store,
        settings=SchedulerSettings(
            reconcile_interval_s=0.5, restart_backoff_s=1.0, leader_ttl_s=TTL
        ),
    )
    task = asyncio.create_task(controller.run())
    c = Cluster(
        store=store,
        url=etcd_url,
        home=tmp_path_factory.mktemp("workers"),
        workers={},
        controller=controller,
        model=local_models.resolve("smollm2-135m-instruct"),
    )
    for node in ("w1", "w2"):
        c.start_worker(node)
    try:
        yield c
    finally:
        for proc in c.workers.values():
            proc.send_signal(signal.SIGTERM)  # drain: stops their engines
        for proc in c.workers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        await controller.stop()
        await asyncio.gather(task, return_exceptions=True)
        for e in await engines(store):
            if e.pid:
                c.seen_pids.append((e.pid, e.pid_start_time))
        for pid, start in c.seen_pids:  # never leave an engine behind, whatever failed
            for p in ([psutil.Process(pid)] if not dead(pid, start) else []) + leftovers(
                pid, start
            ):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        await store.delete_prefix(keys.ROOT)
        await store.close()


def chat_spec(model: str, *, replicas: int = 1) -> DeploymentSpec:
    return DeploymentSpec(
        name="chat",
        model=model,
        served_model_name="smollm2",
        device="cpu",
        replicas=replicas,
        enforce_eager=True,
        max_model_len=2048,
        max_restarts=3,
    )


async def test_deploy_runs_and_answers_with_the_recorded_token(cluster: Cluster) -> None:
    await put_deployment(cluster.store, chat_spec(cluster.model))
    (e,) = await until(cluster, running(1), timeout=START_S)
    cluster.seen_pids.append((e.pid, e.pid_start_time))
    assert e.node in ("w1", "w2") and e.endpoint.startswith("127.0.0.1:")
    assert e.restarts == 0 and e.started_at > 0 and len(e.auth_token) >= 32
    assert [t.state for t in e.history][-4:] == [S.PENDING, S.SCHEDULED, S.STARTING, S.RUNNING]
    answer = await chat(e, "What is the capital of France? Answer in one word.")
    assert "paris" in answer.lower()
    with pytest.raises(AuthenticationError):
        await chat(e.model_copy(update={"auth_token": "wrong"}), "hi")
    log = (cluster.home / "logs" / f"{e.id}.log").read_text()
    assert f"launching on node {e.node}" in log


async def test_sigkilled_engine_fails_and_restarts(cluster: Cluster) -> None:
    (before,) = await engines(cluster.store, "chat")
    core = psutil.Process(before.pid).children(recursive=True)
    assert core, "the shim should have spawned vLLM's EngineCore"
    os.kill(before.pid, signal.SIGKILL)
    (after,) = await until(
        cluster,
        lambda es: len(es) == 1 and es[0].state == S.RUNNING and es[0].pid != before.pid,
        timeout=START_S,
    )
    cluster.seen_pids.append((after.pid, after.pid_start_time))
    assert after.id == before.id and after.restarts == 1
    failed = [t for t in after.history if t.state == S.FAILED]
    assert failed and failed[-1].reason.startswith("engine process killed by SIGKILL")
    assert after.error.startswith("engine process killed by SIGKILL")
    # The worker cleaned up what the killed shim left behind (its EngineCore).
    assert await gone_within([(p.pid, p.create_time()) for p in core], 10)
    assert "paris" in (await chat(after, "What is the capital of France?")).lower()


async def test_two_replicas_spread_over_both_workers(cluster: Cluster) -> None:
    await put_deployment(cluster.store, chat_spec(cluster.model, replicas=2))
    found = await until(cluster, running(2), timeout=START_S)
    cluster.seen_pids += [(e.pid, e.pid_start_time) for e in found]
    assert {e.node for e in found} == {"w1", "w2"}


async def test_killed_worker_is_lost_and_its_engine_moves(cluster: Cluster) -> None:
    found = await engines(cluster.store, "chat")
    victim = next(e for e in found if e.replica == 1)
    survivor = next(n for n in cluster.workers if n != victim.node)
    worker = cluster.workers.pop(victim.node)
    killed_at = time.time()
    worker.kill()
    worker.wait()
    # Its engine process (and the EngineCore under it) do not outlive the worker.
    assert await gone_within([(victim.pid, victim.pid_start_time)], 30), (
        "the killed worker's engine processes survived it"
    )
    moved = await until(
        cluster, lambda es: running(2)(es) and all(e.node == survivor for e in es), timeout=START_S
    )
    cluster.seen_pids += [(e.pid, e.pid_start_time) for e in moved]
    replica = next(e for e in moved if e.id == victim.id)
    lost = [t for t in replica.history if t.state == S.LOST]
    assert lost and lost[-1].reason == f"node {victim.node} lost its lease"
    assert lost[-1].at - killed_at < TTL + 3, "Lost later than a lease TTL after the kill"
    assert replica.restarts == victim.restarts + 1
    assert await cluster.store.get(keys.node(victim.node)) is None


async def test_delete_stops_every_engine_and_removes_the_records(cluster: Cluster) -> None:
    found = await engines(cluster.store, "chat")
    assert len(found) == 2
    start = await cluster.store.range(keys.ENGINES)
    watch = cluster.store.watch(keys.ENGINES, start_revision=start.revision + 1)
    seen: dict[str, list[str]] = {e.id: [] for e in found}

    async def follow() -> None:
        async for ev in watch:
            eid = keys.name_of(ev.key, keys.ENGINES)
            if ev.type == EventType.DELETE:
                seen[eid].append("deleted")
                if all(s and s[-1] == "deleted" for s in seen.values()):
                    return
            else:
                seen[eid].append(decode(Engine, ev.key, ev.value).state.value)

    follower = asyncio.create_task(follow())
    try:
        await cluster.store.delete(keys.deployment("chat"))
        await asyncio.wait_for(follower, timeout=60)
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await watch.aclose()  # type: ignore[attr-defined]
    for eid, states in seen.items():
        assert states[-2:] == ["Stopped", "deleted"], (eid, states)
        assert "Stopping" in states
    assert await gone_within([(e.pid, e.pid_start_time) for e in found], 10)
    assert await engines(cluster.store, "chat") == []


async def test_unplaceable_deployment_stays_pending_with_the_reason(cluster: Cluster) -> None:
    spec = chat_spec(cluster.model).model_copy(update={"name": "needs-gpu", "device": "cuda"})
    await put_deployment(cluster.store, spec)
    (e,) = await until(
        cluster,
        lambda es: len(es) == 1 and es[0].state == S.PENDING and "GPU" in es[0].reason,
        timeout=30,
        deployment="needs-gpu",
    )
    await asyncio.sleep(3)  # several controller and worker rounds later: still Pending
    (later,) = await engines(cluster.store, "needs-gpu")
    assert later.state == S.PENDING and later.reason == e.reason and later.node == ""
    print("NoFit reason:", e.reason)
    await cluster.store.delete(keys.deployment("needs-gpu"))
    await until(cluster, lambda es: es == [], timeout=30, deployment="needs-gpu")
