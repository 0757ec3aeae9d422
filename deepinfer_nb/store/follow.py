"""Following a prefix for as long as the store is open: the one range-then-watch loop that the
controller, the worker, the gateway's routing table and the notebook's cluster view share.

A follower sees a snapshot (`on_snapshot`) and then every change after it (`on_event`), in
revision order. When the history it needs was compacted it re-reads the prefix (a new snapshot)
and goes on from there; when the store stays unreachable past its retry deadline it waits and
resumes from the last revision it saw, so nothing is lost or delivered twice. It returns when the
store is closed, and is stopped by cancelling its task.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable

from ..errors import RevisionCompactedError, StoreError
from .base import MetaStore, RangeResult, WatchEvent

log = logging.getLogger(__name__)

SnapshotHandler = Callable[[RangeResult], Awaitable[None] | None]
EventHandler = Callable[[WatchEvent], Awaitable[None] | None]


async def follow(
    store: MetaStore,
    prefix: str,
    *,
    on_snapshot: SnapshotHandler,
    on_event: EventHandler,
    start_revision: int | None = None,
    retry_delay_s: float = 1.0,
    name: str = "",
) -> None:
    """Mirror `prefix` into the handlers until the store closes.

    `start_revision`: the revision of a snapshot the caller already read (the first event
    delivered is the one after it); None reads the snapshot here first.
    """
    label = name or prefix
    revision = start_revision
    while True:
        try:
            if revision is None:
                snapshot = await store.range(prefix)
                await _call(on_snapshot, snapshot)
                revision = snapshot.revision
            watch = store.watch(prefix, start_revision=revision + 1)
            try:
                async for event in watch:
                    revision = event.revision
                    await _call(on_event, event)
            finally:
                with contextlib.suppress(StoreError, RuntimeError):
                    await watch.aclose()  # type: ignore[attr-defined]
            return  # the store was closed
        except RevisionCompactedError:
            log.warning("%s: watch history compacted; re-reading %s", label, prefix)
            revision = None
        except StoreError as exc:
            log.warning(
                "%s: following %s failed (%s); retrying in %.0f s",
                label,
                prefix,
                exc,
                retry_delay_s,
            )
            await asyncio.sleep(retry_delay_s)


async def _call(handler: Callable[..., object], arg: object) -> None:
    result = handler(arg)
    if inspect.isawaitable(result):
        await result
