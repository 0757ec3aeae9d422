"""`follow`: snapshot then changes in order; a resync after compaction; resumes after errors."""

from __future__ import annotations

import asyncio

from deepinfer_nb.errors import StoreUnavailableError
from deepinfer_nb.store import open_store
from deepinfer_nb.store.base import MetaStore, RangeResult, WatchEvent
from deepinfer_nb.store.follow import follow


class Recorder:
    def __init__(self) -> None:
        self.snapshots: list[list[str]] = []
        self.events: list[tuple[str, int]] = []
        self.changed = asyncio.Event()

    def on_snapshot(self, result: RangeResult) -> None:
        self.snapshots.append([kv.key for kv in result.items])
        self.changed.set()

    async def on_event(self, event: WatchEvent) -> None:
        self.events.append((event.key, event.revision))
        self.changed.set()

    async def until(self, predicate: object, timeout: float = 2.0) -> None:
        async def wait() -> None:
            while not predicate():  # type: ignore[operator]
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


async def test_snapshot_then_every_change_in_order() -> None:
    store = open_store("memory://")
    await store.put("/p/a", b"1")
    rec = Recorder()
    task = asyncio.create_task(
        follow(store, "/p/", on_snapshot=rec.on_snapshot, on_event=rec.on_event)
    )
    await rec.until(lambda: rec.snapshots)
    revs = [await store.put(f"/p/{i}", b"x") for i in range(5)]
    await store.put("/other", b"x")
    await rec.until(lambda: len(rec.events) == 5)
    assert rec.snapshots == [["/p/a"]]
    assert [r for _, r in rec.events] == revs
    await store.close()
    await asyncio.wait_for(task, 2)  # returns when the store closes


async def test_compacted_history_resyncs_with_a_fresh_snapshot() -> None:
    store = open_store("memory://?history=2")
    for i in range(5):
        await store.put(f"/p/{i}", b"x")
    rec = Recorder()
    task = asyncio.create_task(
        follow(store, "/p/", on_snapshot=rec.on_snapshot, on_event=rec.on_event, start_revision=0)
    )
    await rec.until(lambda: rec.snapshots)  # revision 1 is long gone: re-read instead
    assert rec.snapshots == [[f"/p/{i}" for i in range(5)]]
    rev = await store.put("/p/late", b"x")
    await rec.until(lambda: rec.events)
    assert rec.events == [("/p/late", rev)]
    task.cancel()
    await store.close()


class FlakyWatchStore:
    """Delegates to a memory store, but its first watch fails as if etcd stayed down."""

    def __init__(self, inner: MetaStore) -> None:
        self.inner = inner
        self.failures = 1

    async def range(self, prefix: str) -> RangeResult:
        return await self.inner.range(prefix)

    def watch(self, prefix: str, *, start_revision: int = 0):  # type: ignore[no-untyped-def]
        if self.failures:
            self.failures -= 1
            return self._broken()
        return self.inner.watch(prefix, start_revision=start_revision)

    async def _broken(self):  # type: ignore[no-untyped-def]
        raise StoreUnavailableError("etcd://127.0.0.1:1 unreachable")
        yield


async def test_an_unreachable_store_is_retried_from_the_last_revision() -> None:
    inner = open_store("memory://")
    store = FlakyWatchStore(inner)
    rec = Recorder()
    task = asyncio.create_task(
        follow(
            store,  # type: ignore[arg-type]
            "/p/",
            on_snapshot=rec.on_snapshot,
            on_event=rec.on_event,
            retry_delay_s=0.05,
        )
    )
    await rec.until(lambda: rec.snapshots)
    rev = await inner.put("/p/during", b"x")  # written while the watch is down
    await rec.until(lambda: rec.events)
    assert rec.events == [("/p/during", rev)]
    assert len(rec.snapshots) == 1  # resumed, not re-read
    task.cancel()
    await inner.close()
