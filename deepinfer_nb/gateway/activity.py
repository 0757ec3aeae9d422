"""The gateway's report of when each deployment last had requests (for scale to zero).

Serving a request costs one dict write (`note`). A background task publishes the last request
time of deployments that have an `idle_timeout` to their `activity/{name}` record, at most every
`[server] activity_interval_s` and never less often than a quarter of the deployment's own
timeout, so the controller (which decides the scale-down, whichever of several gateways saw the
requests) never sees a deployment as idler than it is by more than that. A deployment with
requests in flight or waiting counts as active now: a long stream is not idleness. Deployments
without an `idle_timeout` cost no store write at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..errors import StoreError
from ..procenv import stop_task
from ..store.activity import record_request
from ..store.base import MetaStore
from .hold import HoldQueue
from .routing import RoutingTable

log = logging.getLogger(__name__)

TICK_S = 0.5
"""How often the reporter looks for something to publish (in memory; writes are rarer)."""


class ActivityReporter:
    def __init__(
        self,
        table: RoutingTable,
        store: MetaStore,
        hold: HoldQueue,
        *,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.table = table
        self.store = store
        self.hold = hold
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._published: dict[str, tuple[float, float]] = {}  # name -> (request time, written at)
        self._task: asyncio.Task[None] | None = None

    def note(self, deployment: str) -> None:
        """A request for `deployment` arrived now."""
        self._last[deployment] = self.clock()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.publish()
            except StoreError as exc:
                log.warning("could not publish request activity (retrying): %s", exc)

    async def publish(self) -> int:
        """Write what is due now; the number of records written."""
        written = 0
        now = self.clock()
        for name, spec in list(self.table.deployments.items()):
            if spec.idle_timeout is None:
                continue
            busy = self.table.inflight(name) + self.hold.held.get(name, 0) > 0
            last = now if busy else self._last.get(name)
            if last is None:
                continue
            seen, written_at = self._published.get(name, (0.0, 0.0))
            period = min(self.interval_s, spec.idle_timeout / 4)
            if last <= seen or now - written_at < period:
                continue
            await record_request(self.store, name, last)
            self._published[name] = (last, now)
            written += 1
        for name in set(self._last) - set(self.table.deployments):
            self._last.pop(name, None)
            self._published.pop(name, None)
        return written
