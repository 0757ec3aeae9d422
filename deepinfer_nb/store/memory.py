"""`memory://`: the embedded, in-process MetaStore with etcd v3 semantics.

It mirrors etcd so one contract suite covers both backends: a global revision counter starting at
1, create/mod revision and version per key, transactions that bump the revision once (and not at
all when nothing changes), watches that replay bounded history from a past revision (older than
the bound behaves as compacted), and leases that expire on time and delete their keys with delete
events in one revision. Use it from one asyncio loop (the Runtime thread's): timers and keepalive
tasks live on the loop running when the lease is granted.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Sequence

from ..errors import LeaseLostError, RevisionCompactedError, StoreError
from ._util import END, LostCallback, QueueWatch, fire_lost_callbacks
from .base import (
    Compare,
    Delete,
    EventType,
    KeyValue,
    Lease,
    MetaStore,
    Put,
    RangeResult,
    TxnResult,
    WatchEvent,
)

DEFAULT_HISTORY = 10_000
"""Events kept for watches from a past revision (etcd keeps all until compacted)."""


class MemoryWatch(QueueWatch):
    """One watch: events are queued synchronously as the store changes, so none is missed."""

    def __init__(self, store: MemoryStore, prefix: str) -> None:
        super().__init__()
        self._store = store
        self.prefix = prefix

    def push(self, item: WatchEvent | BaseException | object) -> None:
        self._queue.put_nowait(item)

    def _ended(self) -> None:
        self._store._watches.discard(self)

    async def aclose(self) -> None:
        self._done = True
        self._store._watches.discard(self)


class MemoryLease(Lease):
    """A lease whose expiry is a timer on the loop; keepalive is a task refreshing every ttl/3."""

    def __init__(self, store: MemoryStore, lease_id: int, ttl: int, *, keepalive: bool) -> None:
        self.id = lease_id
        self.ttl = ttl
        self.keys: set[str] = set()
        self._store = store
        self._loop = asyncio.get_running_loop()
        self._expires = self._loop.time() + ttl
        self._lost = False
        self._ended = False
        self._callbacks: list[LostCallback] = []
        self._timer = self._loop.call_later(ttl, self._check)
        self._keepalive: asyncio.Task[None] | None = (
            self._loop.create_task(self._refresh_forever()) if keepalive else None
        )

    @property
    def lost(self) -> bool:
        return self._lost

    def on_lost(self, callback: LostCallback) -> None:
        self._callbacks.append(callback)

    async def revoke(self) -> None:
        if self._ended:
            return
        self._end()
        self._store._drop_lease(self)

    def stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def refresh(self) -> None:
        if self._ended:
            raise LeaseLostError(f"lease {self.id:x} has expired")
        self._expires = self._loop.time() + self.ttl

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            self.refresh()
            self.renewals += 1

    def _check(self) -> None:
        remaining = self._expires - self._loop.time()
        if remaining > 0:
            self._timer = self._loop.call_later(remaining, self._check)
            return
        self._end()
        self._store._drop_lease(self)
        self._lost = True
        fire_lost_callbacks(self._callbacks, self._store._background)

    def _end(self) -> None:
        self._ended = True
        self._timer.cancel()
        self.stop_keepalive()


class MemoryStore(MetaStore):
    """In-process store; see the module docstring for the etcd semantics it keeps."""

    def __init__(self, url: str = "memory://", *, history: int = DEFAULT_HISTORY) -> None:
        if history < 1:
            raise StoreError(f"{url}: history must be at least 1, got {history}")
        self.url = url
        self._history_limit = history
        self._kv: dict[str, KeyValue] = {}
        self._revision = 1
        self._compact_revision = 0
        self._history: collections.deque[WatchEvent] = collections.deque()
        self._watches: set[MemoryWatch] = set()
        self._leases: dict[int, MemoryLease] = {}
        self._lease_ids = itertools.count(0x1000)
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def revision(self) -> int:
        return self._revision

    # ---- reads ---------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        self._check_open()
        return self._kv.get(key)

    async def range(self, prefix: str) -> RangeResult:
        self._check_open()
        items = sorted(
            (kv for k, kv in self._kv.items() if k.startswith(prefix)), key=lambda kv: kv.key
        )
        return RangeResult(items=items, revision=self._revision)

    # ---- writes --------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self._check_open()
        return self._apply([Put(key, value, lease)])

    async def delete(self, key: str) -> bool:
        self._check_open()
        existed = key in self._kv
        self._apply([Delete(key)])
        return existed

    async def delete_prefix(self, prefix: str) -> int:
        self._check_open()
        keys = sorted(k for k in self._kv if k.startswith(prefix))
        self._apply([Delete(k) for k in keys])
        return len(keys)

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> TxnResult:
        self._check_open()
        ok = all(self._holds(c) for c in compare)
        revision = self._apply(list(success if ok else failure))
        current = {} if ok else {c.key: self._kv.get(c.key) for c in compare}
        return TxnResult(succeeded=ok, revision=revision, current=current)

    def _holds(self, cmp: Compare) -> bool:
        kv = self._kv.get(cmp.key)
        if cmp.target == "create":
            return (kv.create_revision if kv else 0) == cmp.revision
        if cmp.target == "mod":
            return (kv.mod_revision if kv else 0) == cmp.revision
        raise StoreError(f"unknown compare target {cmp.target!r}")

    def _apply(self, ops: Sequence[Put | Delete]) -> int:
        """Apply `ops` atomically under one new revision; no revision when nothing changes."""
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise LeaseLostError(f"lease {op.lease:x} not found (expired or revoked)")
        if not any(isinstance(op, Put) or op.key in self._kv for op in ops):
            return self._revision
        revision = self._revision + 1
        events = [ev for op in ops if (ev := self._apply_one(op, revision)) is not None]
        self._revision = revision
        self._publish(events)
        return revision

    def _apply_one(self, op: Put | Delete, revision: int) -> WatchEvent | None:
        prev = self._kv.get(op.key)
        if prev is not None and prev.lease and prev.lease in self._leases:
            self._leases[prev.lease].keys.discard(op.key)
        if isinstance(op, Delete):
            if prev is None:
                return None
            del self._kv[op.key]
            return WatchEvent(EventType.DELETE, op.key, b"", revision, prev.value)
        self._kv[op.key] = KeyValue(
            key=op.key,
            value=op.value,
            create_revision=prev.create_revision if prev else revision,
            mod_revision=revision,
            version=prev.version + 1 if prev else 1,
            lease=op.lease,
        )
        if op.lease:
            self._leases[op.lease].keys.add(op.key)
        return WatchEvent(EventType.PUT, op.key, op.value, revision, prev.value if prev else None)

    def _publish(self, events: list[WatchEvent]) -> None:
        self._history.extend(events)
        while len(self._history) > self._history_limit:
            # Trim whole revisions so a watch never sees half of a transaction.
            gone = self._history.popleft().revision
            while self._history and self._history[0].revision == gone:
                self._history.popleft()
            self._compact_revision = gone + 1
        for watch in list(self._watches):
            for ev in events:
                if ev.key.startswith(watch.prefix):
                    watch.push(ev)

    # ---- watch, leases, compaction ---------------------------------------------------------------

    def watch(self, prefix: str, *, start_revision: int = 0) -> MemoryWatch:
        self._check_open()
        watch = MemoryWatch(self, prefix)
        if 0 < start_revision < self._compact_revision:
            watch.push(
                RevisionCompactedError(
                    f"{self.url}: revision {start_revision} is compacted (history starts at "
                    f"{self._compact_revision})",
                    compact_revision=self._compact_revision,
                )
            )
            return watch
        if start_revision:
            for ev in self._history:
                if ev.revision >= start_revision and ev.key.startswith(prefix):
                    watch.push(ev)
        self._watches.add(watch)
        return watch

    async def grant_lease(self, ttl: int, *, keepalive: bool = True) -> MemoryLease:
        self._check_open()
        if ttl < 1:
            raise StoreError(f"lease TTL must be at least 1 s, got {ttl}")
        lease = MemoryLease(self, next(self._lease_ids), ttl, keepalive=keepalive)
        self._leases[lease.id] = lease
        return lease

    def _drop_lease(self, lease: MemoryLease) -> None:
        if self._leases.pop(lease.id, None) is None or self._closed:
            return
        self._apply([Delete(k) for k in sorted(lease.keys)])

    async def compact(self, revision: int) -> None:
        self._check_open()
        if revision > self._revision:
            raise StoreError(f"{self.url}: cannot compact to future revision {revision}")
        if revision <= self._compact_revision:
            raise RevisionCompactedError(
                f"{self.url}: revision {revision} is already compacted",
                compact_revision=self._compact_revision,
            )
        while self._history and self._history[0].revision < revision:
            self._history.popleft()
        self._compact_revision = revision

    def fail_fast(self) -> None:
        """Never unreachable: nothing to change."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for lease in list(self._leases.values()):
            lease._end()
        for watch in list(self._watches):
            watch.push(END)
        self._watches.clear()
        for task in list(self._background):
            task.cancel()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.url}: store is closed")
