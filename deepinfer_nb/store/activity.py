"""Writes of `activity/{deployment}` records (`models.Activity`): request times and waking.

Gateways, and the kernel when it chats with an engine directly, report requests with
`record_request`: a read-modify-write by compare-and-swap that only moves `last_request_at`
forward, so gateways reporting at their own pace never set it back. A request newer than the
moment the controller scaled the deployment to zero also clears `idle`: that is how the next
request wakes it (the controller then starts its engines). The controller sets `idle` itself,
by compare-and-swap on the record as it read it (control/reconcile.py, `SetIdle`), so a request
recorded meanwhile wins.
"""

from __future__ import annotations

from ..models import Activity
from . import decode_record, decode_records, keys
from .base import MetaStore

MAX_TRIES = 8
"""Compare-and-swap attempts before giving up (only concurrent writers make one fail)."""


def recorded(
    current: Activity | None, name: str, at: float, *, wake: bool = False
) -> Activity | None:
    """The record after a request at `at` (None: nothing to write). `wake`: a request waits
    now, so an idle deployment wakes whatever the clocks say."""
    if current is None:
        return Activity(deployment=name, last_request_at=at)
    if current.idle and (wake or at > current.idle_since):
        last = max(at, current.last_request_at)
        return current.model_copy(update={"idle": False, "last_request_at": last})
    if at > current.last_request_at and not current.idle:
        return current.model_copy(update={"last_request_at": at})
    return None


async def record_request(store: MetaStore, name: str, at: float, *, wake: bool = False) -> bool:
    """Record a request for deployment `name` at `at` (wall clock); True if it woke the
    deployment from idle (`wake`: a request is waiting for it now)."""
    key = keys.activity(name)
    for _ in range(MAX_TRIES):
        kv = await store.get(key)
        current = decode_record(Activity, key, kv.value) if kv is not None else None
        updated = recorded(current, name, at, wake=wake)
        if updated is None:
            return False
        woke = current is not None and current.idle and not updated.idle
        if kv is None:
            if await store.create(key, updated.encode()):
                return woke
        elif (await store.compare_and_swap(kv, updated.encode())).succeeded:
            return woke
    return False


async def read_all(store: MetaStore) -> dict[str, Activity]:
    """Every deployment's activity record, by deployment name."""
    return decode_records(Activity, (await store.range(keys.ACTIVITY)).items, keys.ACTIVITY)
