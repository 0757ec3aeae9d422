"""Small helpers shared by the store backends: prefix ranges and lease-lost callbacks."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

LostCallback = Callable[[], Awaitable[None] | None]


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
