"""Each process's own figures in the store (control/metrics.py): `ServiceSet` publishes its
controller's counters and its store client's errors to `metrics/{process}` under a lease, and
the key goes when the services stop."""

from __future__ import annotations

import asyncio

from deepinfer_nb.config import Settings
from deepinfer_nb.models import DeploymentSpec, ProcessMetrics, decode
from deepinfer_nb.services import ServiceSet
from deepinfer_nb.store import keys


async def _snapshot(services: ServiceSet, *, timeout: float = 5.0) -> ProcessMetrics:
    assert services.store is not None
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = (await services.store.range(keys.METRICS)).items
        if found:
            (kv,) = found
            snap = decode(ProcessMetrics, kv.key, kv.value)
            c = snap.controller
            if c is not None and c.leader and c.actions.get("create"):
                assert kv.lease != 0  # vanishes with the process
                return snap
        assert asyncio.get_running_loop().time() < deadline, "no controller snapshot"
        await asyncio.sleep(0.05)


async def test_controller_figures_reach_the_store_and_go_with_the_process() -> None:
    settings = Settings()
    settings.server.metrics_interval_s = 0.1
    settings.scheduler.reconcile_interval_s = 0.1
    services = ServiceSet(settings)
    store = await services.open_store("memory://")
    try:
        await services.start_controller()
        # no node registered: the engine is created, then left Pending (NoFit)
        await store.put(keys.deployment("d"), DeploymentSpec(name="d", model="m").encode())
        snap = await _snapshot(services)
        assert snap.worker is None and snap.store.url == "memory://"
        assert (snap.process, snap.store.failures) == (services._process_name, 0)
        c = snap.controller
        assert c is not None and c.placements == 0  # nowhere to place it
        assert c.rounds >= 1 and sum(c.reconcile_seconds.counts) == c.rounds
        publisher = services.publisher
        assert publisher is not None
        await publisher.stop()  # as the services' stop does, before the store closes
        assert (await store.range(keys.METRICS)).items == []
    finally:
        await services.aclose()
