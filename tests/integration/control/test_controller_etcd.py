"""Two real `deepinfer-nb controller` processes on a real etcd: only the leader acts, and SIGKILL
of the leader hands over within the leader lease TTL. A gateway in this process shows both
controllers' own figures at /metrics (each process publishes them to the store).

The node is a record registered under a lease by the test (the controller only reads it); real
workers and engines are covered by the worker's integration tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deepinfer_nb.config import Settings
from deepinfer_nb.control.controller import LEADER_KEY
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState, Node, decode
from deepinfer_nb.store import MetaStore, keys

pytestmark = pytest.mark.etcd

TTL = 2
# Only the controller subcommand is registered: this test does not depend on the other commands.
RUN = (
    "import argparse, sys\n"
    "from deepinfer_nb.cli import controller\n"
    "p = argparse.ArgumentParser(); controller.register(p.add_subparsers())\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "sys.exit(a.func(a))\n"
)


def start_controller(url: str, identity: str, log: Path) -> subprocess.Popen[bytes]:
    args = [
        "controller",
        "--store",
        url,
        "--identity",
        identity,
        "--leader-ttl",
        str(TTL),
        "--reconcile-interval",
        "0.5",
        "--log-format",
        "json",
    ]
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", RUN, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DEEPINFER_SERVER__METRICS_INTERVAL_S": "0.2"},
        )


async def until(check: Callable[[], Awaitable[bool]], *, timeout: float) -> float:
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def leader(store: MetaStore) -> str:
    kv = await store.get(LEADER_KEY)
    return kv.value.decode() if kv is not None else ""


async def _metrics_show_one_leader(store: MetaStore, first: str) -> None:
    """Both controller processes at the gateway's /metrics: `first` leads and placed the engine."""
    settings = Settings()
    settings.server.metrics_interval_s = 0.2
    async with (
        GatewayServer(build_app(store, settings=settings), host="127.0.0.1", port=0) as gw,
        httpx.AsyncClient(base_url=gw.url) as http,
    ):
        figures: dict[str, tuple[float, float]] = {}

        async def both_shown() -> bool:
            text = (await http.get("/metrics")).text
            fams = {f.name: f.samples for f in text_string_to_metric_families(text)}
            leading = {s.labels["identity"]: s.value for s in fams["deepinfer_controller_leader"]}
            placed = {
                s.labels["identity"]: s.value for s in fams["deepinfer_controller_placements"]
            }
            figures.update({k: (v, placed.get(k, 0.0)) for k, v in leading.items()})
            return leading.get(first) == 1 and placed.get(first, 0) >= 1 and len(leading) == 2

        await until(both_shown, timeout=10)
    standby = next(k for k in figures if k != first)
    assert figures[standby] == (0.0, 0.0), figures


async def engines(store: MetaStore) -> list[Engine]:
    items = (await store.range(keys.ENGINES)).items
    return sorted((decode(Engine, kv.key, kv.value) for kv in items), key=lambda e: e.replica)


@pytest.fixture
async def node(etcd_store: MetaStore) -> AsyncIterator[str]:
    lease = await etcd_store.grant_lease(10)
    await etcd_store.put(keys.node("n1"), Node(id="n1").encode(), lease=lease.id)
    yield "n1"
    await lease.revoke()


async def test_two_controllers_one_leader_and_handover_on_sigkill(
    etcd_store: MetaStore, etcd_url: str, node: str, tmp_path: Path
) -> None:
    procs = {
        name: start_controller(etcd_url, name, tmp_path / f"{name}.log") for name in ("c1", "c2")
    }
    try:

        async def elected() -> bool:
            return await leader(etcd_store) in procs

        await until(elected, timeout=20)
        first = await leader(etcd_store)
        standby = next(n for n in procs if n != first)

        spec = DeploymentSpec(name="d", model="m", device="cpu", replicas=1)
        await etcd_store.put(keys.deployment("d"), spec.encode())

        async def scheduled(count: int) -> bool:
            es = await engines(etcd_store)
            return len(es) == count and all(e.state == EngineState.SCHEDULED for e in es)

        await until(lambda: scheduled(1), timeout=10)
        await asyncio.sleep(1.0)  # both controllers saw the deployment: still exactly one engine
        (engine,) = await engines(etcd_store)
        assert (engine.node, engine.device) == (node, "cpu")
        assert f'"controller {first} is the leader"' in (tmp_path / f"{first}.log").read_text()
        assert "is the leader" not in (tmp_path / f"{standby}.log").read_text()
        await _metrics_show_one_leader(etcd_store, first)

        procs[first].send_signal(signal.SIGKILL)
        procs[first].wait(timeout=5)
        killed_at = time.monotonic()

        async def handed_over() -> bool:
            return await leader(etcd_store) == standby

        await until(handed_over, timeout=TTL + 5)
        # etcd expires leases on its own ticks (~0.5 s): allow that beyond one TTL.
        assert time.monotonic() - killed_at <= TTL + 1.0

        await etcd_store.put(keys.deployment("d"), spec.model_copy(update={"replicas": 2}).encode())
        await until(lambda: scheduled(2), timeout=10)
        assert (await engines(etcd_store))[0].id == engine.id
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"controller {name} ignored SIGTERM") from None
    # The survivor resigned on SIGTERM: it exits 0 and leaves no leader key behind.
    assert procs[standby].returncode == 0
    assert await leader(etcd_store) == ""
