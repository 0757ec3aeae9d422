"""Small helpers shared by the store backends: prefix ranges, lease-lost callbacks and the
queue-fed watch iterator."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from .base import WatchEvent

log = logging.getLogger(__name__)

LostCallback = Callable[[], Awaitable[None] | None]

END = object()
"""The item that ends a `QueueWatch` cleanly."""


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range_end for every key starting with `prefix` (b"\\0" for the whole keyspace)."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def fire_lost_callbacks(callbacks: list[LostCallback], tasks: set[asyncio.Task[None]]) -> None:
    """Run lost-lease callbacks; awaitable results run as tasks (kept in `tasks`) so a slow
    callback blocks nothing and a failing one is logged, not raised into the store."""
    for callback in callbacks:
        try:
            result = callback()
        except Exception:
            log.exception("lease-lost callback %r failed", callback)
            continue
        if inspect.isawaitable(result):
            task: asyncio.Task[None] = asyncio.ensure_future(result)
            tasks.add(task)
            task.add_done_callback(_log_failure)
            task.add_done_callback(tasks.discard)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("lease-lost callback failed", exc_info=task.exception())


class QueueWatch(AsyncIterator[WatchEvent]):
    """A watch whose events arrive through a queue; the first item that is not an event ends it:
    an exception is raised to the reader, anything else (`END`) stops the iteration."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[WatchEvent | BaseException | object] = asyncio.Queue()
        self._done = False

    def __aiter__(self) -> QueueWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, WatchEvent):
            return item
        self._done = True
        self._ended()
        if isinstance(item, BaseException):
            raise item
        raise StopAsyncIteration

    def _ended(self) -> None:
        """Called once, when the reader takes the item that ends the watch."""
