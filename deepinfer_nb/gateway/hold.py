"""Holding requests while a replica comes back, instead of failing them.

When a deployment has no Running replica but one is on its way (a restart, a scale from zero, a
rollout: `routing.coming`), `HoldQueue.lease` keeps the request waiting, up to `[server]
hold_timeout_s` and at most `max_held_requests` per deployment, and hands it a replica as soon
as the routing table (fed by the store watch) shows one Running. Beyond the bound, or past the
timeout, it answers 503 with `Retry-After`. A request for a deployment that is absent, scaled to
0 replicas or whose engines failed for good fails at once, as before. A request for a deployment
scaled to zero wakes it (`store.activity.record_request`) and waits like the others.

A request that found its replica unreachable (`EngineUnavailableError`: the engine died and its
worker has not marked it Failed yet) waits the same way for another run of an engine: it is
retried once the table shows a change, never on the incarnation that refused it.

The queue is also a prometheus_client collector (registered by `build_app`):
`deepinfer_gateway_held_requests{deployment}`, the requests waiting now, 0 for every other
deployment the gateway knows, so a stuck start shows up before its 503s do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from ..models import DeploymentSpec
from ..store.activity import record_request
from ..store.base import MetaStore
from .errors import APIError, no_replica
from .routing import Lease, RoutingTable, unavailable_reason

log = logging.getLogger(__name__)

RETRY_AFTER_FULL_S = 1.0
"""Retry-After when the queue is full: it drains at once when the engine is ready."""
HOLD_CODES = frozenset({"replica_starting", "hold_queue_full"})
"""The error codes of requests that waited (or could not) for a replica on its way."""


def held_too_long(name: str, waited_s: float, reason: str, retry_after_s: float) -> APIError:
    """The 503 of a request that waited `waited_s` for a replica in vain."""
    return APIError(
        503,
        f"deployment {name} is not ready after {waited_s:.1f} s of waiting ({reason}); retry later",
        type="service_unavailable",
        code="replica_starting",
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


def queue_full(name: str, limit: int) -> APIError:
    return APIError(
        503,
        f"deployment {name} is starting and {limit} requests already wait for it; retry shortly",
        type="service_unavailable",
        code="hold_queue_full",
        headers={"Retry-After": str(math.ceil(RETRY_AFTER_FULL_S))},
    )


class HoldQueue:
    """Requests waiting for a replica, per deployment (bounded), and the waking of idle ones."""

    def __init__(
        self,
        table: RoutingTable,
        store: MetaStore | None,
        *,
        timeout_s: float = 60.0,
        max_held: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.table = table
        self.store = store
        self.timeout_s = timeout_s
        self.max_held = max_held
        self.clock = clock
        self.held: Counter[str] = Counter()
        """Requests waiting now, per deployment."""
        self._wakes: dict[str, asyncio.Task[None]] = {}

    def acquire(self, spec: DeploymentSpec, *, exclude: tuple[str, ...] = ()) -> Lease | None:
        """A lease at once, None when the request may wait, or the 503 of a deployment that
        cannot serve and has nothing on its way."""
        try:
            return self.table.acquire(spec, exclude=exclude)
        except APIError:
            if self.table.is_idle(spec.name):
                self._wake(spec.name)  # even when requests may not wait: the next one is served
            if self.timeout_s <= 0 or not self.table.coming(spec, tried=exclude):
                raise
        return None

    async def lease(self, spec: DeploymentSpec, *, tried: dict[str, object] | None = None) -> Lease:
        """A lease on a Running replica of `spec`, waiting for one while one is on its way.

        `tried`: engine id -> incarnation (`RoutingTable.incarnation`) of replicas this request
        found unreachable; each is skipped until its record changes (a restart)."""
        tried = dict(tried or {})
        lease = self.acquire(spec, exclude=tuple(tried))
        if lease is not None:
            return lease
        name = spec.name
        if self.held[name] >= self.max_held:
            raise queue_full(name, self.max_held)
        self.held[name] += 1
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.timeout_s
        try:
            while True:
                if self.table.is_idle(name):
                    self._wake(name)
                changed = self.table.changed(name)
                try:
                    await asyncio.wait_for(changed, max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise held_too_long(
                        name,
                        loop.time() - start,
                        self._reason(spec),
                        retry_after_s=self.timeout_s / 4,
                    ) from None
                current = self.table.deployments.get(name)
                if current is None:
                    raise no_replica(f"deployment {name} was deleted while the request waited")
                spec = current
                for engine_id, seen in list(tried.items()):
                    if self.table.incarnation(engine_id) != seen:
                        del tried[engine_id]  # a new run of that engine: worth trying again
                lease = self.acquire(spec, exclude=tuple(tried))
                if lease is not None:
                    return lease
        finally:
            self.held[name] -= 1
            if not self.held[name]:
                del self.held[name]

    def describe(self) -> list[Metric]:
        return []  # the samples depend on the deployments: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "deepinfer_gateway_held_requests",
            "Requests waiting for a replica on its way (Starting, waking, rolling out)",
            labels=["deployment"],
        )
        held = dict.fromkeys(self.table.deployments, 0) | dict(self.held)
        for name, n in sorted(held.items()):
            family.add_metric([name], n)
        yield family

    def _reason(self, spec: DeploymentSpec) -> str:
        if self.table.is_idle(spec.name):
            return "scaled to zero; waking it"
        return unavailable_reason(spec, self.table.engines_of(spec.name))

    def _wake(self, name: str) -> None:
        """Clear the deployment's idle flag in the store (once at a time per deployment)."""
        if self.store is None or name in self._wakes:
            return
        store = self.store

        async def wake() -> None:
            try:
                if await record_request(store, name, self.clock(), wake=True):
                    log.info("deployment %s: a request woke it from scale to zero", name)
            except Exception as exc:  # a held request retries the wake at the next change
                log.warning("deployment %s: could not wake it: %s", name, exc)
            finally:
                self._wakes.pop(name, None)

        self._wakes[name] = asyncio.get_running_loop().create_task(wake())

    async def close(self) -> None:
        tasks = list(self._wakes.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
