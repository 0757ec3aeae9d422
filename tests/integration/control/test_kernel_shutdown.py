"""The kernel's cluster (the Python API's in-kernel services on a real etcd) shut down after etcd
went away: the deployments it created cannot be deleted, so it says which to delete later, does
not wait for engines the store can no longer show stopping, and its worker still stops its own
engines. Before, the stop waited out every retry and then the whole grace (minutes).

The engine is the fake one (tests/fixtures/fake_engine.py): what is under test is the stop.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psutil
import pytest

import deepinfer_nb
from deepinfer_nb.client.cluster import Cluster
from deepinfer_nb.config import Settings
from deepinfer_nb.models import Engine
from deepinfer_nb.store import open_store
from deepinfer_nb.store.local_etcd import LocalEtcd

pytestmark = pytest.mark.etcd


def test_shutdown_with_etcd_gone_stops_the_engines_and_names_what_is_left(
    etcd_restarted: LocalEtcd, fake_python: str, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(_clear(etcd_restarted.url))  # earlier tests' deployments would be placed here
    settings = Settings()
    settings.agent.engine_python = fake_python
    cluster = deepinfer_nb.connect(
        etcd_restarted.url, worker=True, gateway_port=None, node_id="kernel", settings=settings
    )
    try:
        cluster.deploy("m", name="kshut", device="cpu")  # the fake engine: it stays Starting
        deadline = time.monotonic() + 30
        while not (launched := _launched(cluster, "kshut")):
            assert time.monotonic() < deadline, "the engine was never launched"
            time.sleep(0.2)
        (engine,) = launched
        etcd_restarted.kill()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="deepinfer_nb"):
            cluster.shutdown(timeout=120)
        # one delete's full retry (about 10 s), then seconds; before: that plus the 90 s grace
        assert time.monotonic() - started < 45
    finally:
        cluster.shutdown(timeout=120)
    assert not cluster.connected
    assert not psutil.pid_exists(engine.pid) or (
        psutil.Process(engine.pid).status() == psutil.STATUS_ZOMBIE
    )
    assert "could not delete deployment kshut" in caplog.text
    assert "delete it once the store is back" in caplog.text
    etcd_restarted.restart()
    asyncio.run(_clear(etcd_restarted.url))  # leave nothing to the next test


def _launched(cluster: Cluster, deployment: str) -> list[Engine]:
    engines = cluster.snapshot().engines.values()
    return [e for e in engines if e.deployment == deployment and e.pid > 0]


async def _clear(url: str) -> None:
    async with open_store(url) as store:
        await store.delete_prefix("")
