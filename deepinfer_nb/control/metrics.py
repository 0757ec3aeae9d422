"""The control plane's own figures, and how they leave the process.

`ControllerCounters` and `WorkerCounters` are kept by the controller and the worker as they work
(no I/O). `MetricsPublisher` writes one `ProcessMetrics` snapshot of the whole process (its
controller, its worker, its store client's errors) to `metrics/{process}` every few seconds,
bound to a lease so the key vanishes with the process. The gateway renders every such key at its
`/metrics`: one scrape target shows controllers and workers wherever they run (a worker on a GPU
host behind NAT needs no port of its own), and a notebook's in-kernel services the same way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Callable

from ..engine.stats import Buckets
from ..errors import LeaseLostError, StoreError
from ..models import ControllerMetrics, HistogramData, ProcessMetrics, WorkerMetrics
from ..procenv import stop_task
from ..store import Lease, MetaStore, keys

log = logging.getLogger(__name__)

RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


_names = itertools.count(1)


def process_name() -> str:
    """A new name for one set of services in metric labels and its snapshot key: `host-pid`,
    then `host-pid-2`, ... for further sets in the same process (tests, a notebook beside a CLI)."""
    n = next(_names)
    return f"{socket.gethostname()}-{os.getpid()}" + (f"-{n}" if n > 1 else "")


class ControllerCounters:
    def __init__(self) -> None:
        self.rounds = 0
        self.actions: collections.Counter[str] = collections.Counter()
        self.conflicts = 0
        self.placements = 0
        self.restarts = 0
        self._duration = Buckets(RECONCILE_BUCKETS)

    def round_done(self, seconds: float) -> None:
        self.rounds += 1
        self._duration.observe(seconds)

    def snapshot(self, *, identity: str, leader: bool) -> ControllerMetrics:
        h = self._duration.snapshot()
        duration = HistogramData(bounds=list(h.bounds), counts=list(h.counts), sum=h.sum)
        return ControllerMetrics(
            identity=identity,
            leader=leader,
            rounds=self.rounds,
            reconcile_seconds=duration,
            actions=dict(self.actions),
            conflicts=self.conflicts,
            placements=self.placements,
            restarts=self.restarts,
        )


class WorkerCounters:
    def __init__(self) -> None:
        self.launches: collections.Counter[str] = collections.Counter()
        self.lease_losses = 0
        self._renewals = 0  # of the leases this worker held before its current one
        self._renewal_failures = 0

    def lease_replaced(self, old: Lease | None) -> None:
        """Keep the counts of a lease the worker stops using (lost, or revoked on stop)."""
        if old is not None:
            self._renewals += old.renewals
            self._renewal_failures += old.renewal_failures

    def snapshot(self, *, node: str, lease: Lease | None, engines: int) -> WorkerMetrics:
        renewals, failures = (lease.renewals, lease.renewal_failures) if lease else (0, 0)
        return WorkerMetrics(
            node=node,
            lease_renewals=self._renewals + renewals,
            lease_renewal_failures=self._renewal_failures + failures,
            lease_losses=self.lease_losses,
            launches=dict(self.launches),
            engines=engines,
        )


class MetricsPublisher:
    """Writes `collect()` to `metrics/{process}` every `interval_s`, under a lease of three
    intervals (at least 5 s); `await stop()` revokes it, deleting the key."""

    def __init__(
        self, store: MetaStore, *, collect: Callable[[], ProcessMetrics], interval_s: float
    ) -> None:
        self._store = store
        self._collect = collect
        self._interval_s = interval_s
        self._lease: Lease | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="deepinfer-metrics-publisher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        lease, self._lease = self._lease, None
        if lease is not None and not lease.lost:
            with contextlib.suppress(StoreError):
                await lease.revoke()

    async def publish_once(self) -> None:
        snapshot = self._collect()
        if self._lease is None or self._lease.lost:
            ttl = max(5, round(3 * self._interval_s))
            self._lease = await self._store.grant_lease(ttl, keepalive=True)
        await self._store.put(
            keys.metrics(snapshot.process), snapshot.encode(), lease=self._lease.id
        )

    async def _run(self) -> None:
        while True:
            try:
                await self.publish_once()
            except LeaseLostError:
                self._lease = None  # expired while the store was away: a new one next round
            except StoreError as exc:  # counted by the store; the next round tries again
                log.debug("metrics snapshot not written: %s", exc)
            await asyncio.sleep(self._interval_s)
