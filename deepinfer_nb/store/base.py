"""The MetaStore interface: an async key-value store with etcd v3 semantics.

Both implementations (`memory://`, `etcd://`) pass one contract test suite. Keys and values are
bytes-free `str` keys and `bytes` values; revisions are the store's global, monotonically
increasing counter, exactly as etcd's.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclasses.dataclass(frozen=True)
class RangeResult:
    """A consistent snapshot of a prefix at `revision` (the header revision)."""

    items: list[KeyValue]
    revision: int


class EventType(str, enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    type: EventType
    key: str
    value: bytes  # empty for deletes
    revision: int  # mod_revision of the change
    prev_value: bytes | None = None


# ---- transactions: a small, store-neutral form of etcd's Txn ------------------------------------


@dataclasses.dataclass(frozen=True)
class Compare:
    """`key`'s mod_revision (or create_revision) == `revision`. 0 means "absent"."""

    key: str
    revision: int
    target: str = "mod"  # "mod" | "create"

    @classmethod
    def absent(cls, key: str) -> Compare:
        return cls(key=key, revision=0, target="create")

    @classmethod
    def unchanged(cls, kv: KeyValue) -> Compare:
        return cls(key=kv.key, revision=kv.mod_revision, target="mod")


@dataclasses.dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclasses.dataclass(frozen=True)
class Delete:
    key: str


@dataclasses.dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    # on failure: the current values of the compared keys (None where absent)
    current: dict[str, KeyValue | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StoreCounters:
    """What went wrong talking to the store, since the client opened (exported as metrics)."""

    retries: int = 0
    """Calls retried after a temporary failure (etcd briefly down, no leader)."""
    failures: int = 0
    """Calls that raised after their retries."""


class Lease(abc.ABC):
    """A granted lease. With keepalive on, the store refreshes it every ttl/3 in the background."""

    id: int
    ttl: int
    renewals: int = 0
    """Keepalive refreshes that succeeded."""
    renewal_failures: int = 0
    """Keepalive refreshes that failed (the lease is lost once they fail for a whole TTL)."""

    @property
    @abc.abstractmethod
    def lost(self) -> bool:
        """True once the lease expired or refreshing it failed for a whole TTL."""

    @abc.abstractmethod
    def on_lost(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Call `callback` once when the lease is lost (not when revoked on purpose)."""

    @abc.abstractmethod
    async def revoke(self) -> None:
        """Revoke now: every key attached to it is deleted. Stops the keepalive."""

    @abc.abstractmethod
    def stop_keepalive(self) -> None:
        """Stop refreshing; the lease then expires after its TTL (tests, crash simulation)."""


class MetaStore(abc.ABC):
    """Async metadata store. Every method may raise `StoreUnavailableError` after retrying."""

    url: str

    @functools.cached_property
    def counters(self) -> StoreCounters:
        return StoreCounters()

    @abc.abstractmethod
    async def get(self, key: str) -> KeyValue | None: ...

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write `value`; returns the new revision."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """True if the key existed."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Number of keys deleted."""

    @abc.abstractmethod
    async def range(self, prefix: str) -> RangeResult:
        """Every key starting with `prefix`, sorted by key, as one consistent snapshot."""

    @abc.abstractmethod
    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> TxnResult:
        """Atomically: if every compare holds, apply `success`, else `failure`."""

    @abc.abstractmethod
    def watch(self, prefix: str, *, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        """Events under `prefix` in revision order, from `start_revision` (0: from now on).

        Survives connection loss (resumes at last seen revision + 1: nothing lost or repeated).
        Raises `RevisionCompactedError` when `start_revision` is older than kept history.
        The iterator ends when the store is closed; `aclose()` it to stop early.
        """

    @abc.abstractmethod
    async def grant_lease(self, ttl: int, *, keepalive: bool = True) -> Lease: ...

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Forget history before `revision`: watches starting earlier raise
        `RevisionCompactedError`. Current values are untouched."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def fail_fast(self) -> None:
        """From now on, give up on an unreachable store after a brief retry. For a shutdown:
        a store that is down cannot record the drain anyway (leases expire by themselves),
        and a stop must not wait a full retry deadline for every write."""

    async def __aenter__(self) -> MetaStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # convenience built on the primitives

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        """Put only if absent; True if this call created it."""
        res = await self.txn([Compare.absent(key)], [Put(key, value, lease)])
        return res.succeeded

    async def compare_and_swap(self, kv: KeyValue, value: bytes, *, lease: int = 0) -> TxnResult:
        """Replace `kv` only if nobody changed it since it was read."""
        return await self.txn([Compare.unchanged(kv)], [Put(kv.key, value, lease)])
