"""The MetaStore contract: every test runs against `memory://` and a real etcd server.

The etcd-only tests at the end kill the real server (SIGKILL) mid-watch and mid-write, and revoke
a lease behind the keepalive's back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from deepinfer_nb.errors import LeaseLostError, RevisionCompactedError, StoreUnavailableError
from deepinfer_nb.models import DeploymentSpec
from deepinfer_nb.netutil import free_port
from deepinfer_nb.store import (
    Compare,
    Delete,
    EventType,
    MetaStore,
    Put,
    WatchEvent,
    decode_record,
    open_store,
)
from deepinfer_nb.store.etcd import EtcdStore
from deepinfer_nb.store.local_etcd import LocalEtcd


async def take(
    watch: AsyncIterator[WatchEvent], n: int, *, timeout: float = 10.0
) -> list[WatchEvent]:
    """The next `n` events, or fail after `timeout` showing what did arrive."""
    got: list[WatchEvent] = []

    async def collect() -> None:
        async for ev in watch:
            got.append(ev)
            if len(got) == n:
                return

    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        pytest.fail(f"got {len(got)} of {n} events in {timeout} s: {got[-3:]}")
    return got


# ---- key-value ----------------------------------------------------------------------------------


async def test_put_get_revisions_and_versions(store: MetaStore, key_prefix: str) -> None:
    key = key_prefix + "a"
    assert await store.get(key) is None
    r1 = await store.put(key, b"one")
    kv = await store.get(key)
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
        b"one",
        r1,
        r1,
        1,
        0,
    )
    r2 = await store.put(key, b"two")
    assert r2 > r1
    kv = await store.get(key)
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"two", r1, r2, 2)

    assert await store.delete(key) is True
    assert await store.get(key) is None
    before = (await store.range(key_prefix)).revision
    assert await store.delete(key) is False
    assert (await store.range(key_prefix)).revision == before  # a no-op delete makes no revision
    r3 = await store.put(key, b"three")
    kv = await store.get(key)
    assert kv is not None and (kv.create_revision, kv.version) == (r3, 1)  # a new life


async def test_range_is_a_sorted_snapshot_with_header_revision(
    store: MetaStore, key_prefix: str
) -> None:
    revs = [await store.put(key_prefix + name, name.encode()) for name in ("b", "a", "c/d")]
    await store.put("/elsewhere/" + key_prefix, b"x")
    res = await store.range(key_prefix)
    assert [kv.key for kv in res.items] == [key_prefix + k for k in ("a", "b", "c/d")]
    assert res.revision >= max(revs)
    assert res.revision == (await store.range("/elsewhere/")).revision  # one global counter
    assert await store.delete_prefix(key_prefix) == 3
    assert (await store.range(key_prefix)).items == []
    assert await store.get("/elsewhere/" + key_prefix) is not None


async def test_create_if_absent_and_compare_and_swap(store: MetaStore, key_prefix: str) -> None:
    key = key_prefix + "claim"
    assert await store.create(key, b"first") is True
    assert await store.create(key, b"second") is False
    kv = await store.get(key)
    assert kv is not None and kv.value == b"first"

    won = await store.compare_and_swap(kv, b"mine")
    assert won.succeeded and won.revision > kv.mod_revision
    lost = await store.compare_and_swap(kv, b"stale")  # kv is now out of date
    assert not lost.succeeded
    current = lost.current[key]
    assert current is not None and current.value == b"mine"
    assert current.mod_revision == won.revision


async def test_txn_applies_one_branch_atomically(store: MetaStore, key_prefix: str) -> None:
    a, b, flag = key_prefix + "a", key_prefix + "b", key_prefix + "flag"
    await store.put(a, b"1")
    res = await store.txn(
        [Compare.absent(flag)],
        [Put(flag, b"on"), Delete(a), Put(b, b"2")],
        [Put(key_prefix + "never", b"x")],
    )
    assert res.succeeded
    after = await store.range(key_prefix)
    assert {kv.key: kv.value for kv in after.items} == {flag: b"on", b: b"2"}
    assert {kv.mod_revision for kv in after.items} == {res.revision}  # one revision for all
    res2 = await store.txn(
        [Compare.absent(flag)], [Put(key_prefix + "never", b"x")], [Put(key_prefix + "else", b"y")]
    )
    assert not res2.succeeded
    assert await store.get(key_prefix + "else") is not None
    assert await store.get(key_prefix + "never") is None


async def test_ten_concurrent_claimers_exactly_one_wins(store: MetaStore, key_prefix: str) -> None:
    key = key_prefix + "engine"
    await store.put(key, b"scheduled")
    seen = await store.get(key)
    assert seen is not None

    have_read = 0
    all_read = asyncio.Event()

    async def claim(i: int) -> bool:
        nonlocal have_read
        kv = await store.get(key)
        assert kv is not None
        have_read += 1
        if have_read == 10:
            all_read.set()
        await all_read.wait()  # every claimer read the same version before anyone writes
        res = await store.compare_and_swap(kv, f"w{i}".encode())
        return res.succeeded

    wins = await asyncio.gather(*(claim(i) for i in range(10)))
    assert sum(wins) == 1
    final = await store.get(key)
    assert final is not None and final.value == f"w{wins.index(True)}".encode()


# ---- watch --------------------------------------------------------------------------------------


async def test_watch_from_past_revision_then_live(store: MetaStore, key_prefix: str) -> None:
    r1 = await store.put(key_prefix + "x", b"1")
    await store.put("/other/" + key_prefix, b"ignored")
    await store.put(key_prefix + "x", b"2")
    await store.delete(key_prefix + "x")
    watch = store.watch(key_prefix, start_revision=r1)
    try:
        past = await take(watch, 3)
        await store.put(key_prefix + "y", b"3")
        live = await take(watch, 1)
    finally:
        await watch.aclose()
    events = past + live
    assert [(e.type, e.key, e.value) for e in events] == [
        (EventType.PUT, key_prefix + "x", b"1"),
        (EventType.PUT, key_prefix + "x", b"2"),
        (EventType.DELETE, key_prefix + "x", b""),
        (EventType.PUT, key_prefix + "y", b"3"),
    ]
    assert events[0].revision == r1
    assert events[2].prev_value == b"2"
    assert [e.revision for e in events] == sorted({e.revision for e in events})


async def test_watch_from_now_sees_only_new_events(store: MetaStore, key_prefix: str) -> None:
    await store.put(key_prefix + "old", b"0")
    watch = store.watch(key_prefix)
    try:
        # Let the server register the watch; "from now" is from then on.
        await asyncio.sleep(0.2)
        rev = await store.put(key_prefix + "new", b"1")
        [ev] = await take(watch, 1)
    finally:
        await watch.aclose()
    assert (ev.key, ev.revision) == (key_prefix + "new", rev)


async def test_thousand_puts_seen_in_order_by_concurrent_watcher(
    store: MetaStore, key_prefix: str
) -> None:
    start = (await store.range(key_prefix)).revision + 1
    watch = store.watch(key_prefix, start_revision=start)
    collector = asyncio.create_task(take(watch, 1000, timeout=30))
    revs = [await store.put(f"{key_prefix}k{i % 7}", str(i).encode()) for i in range(1000)]
    events = await collector
    await watch.aclose()
    assert [e.value for e in events] == [str(i).encode() for i in range(1000)]
    assert [e.revision for e in events] == revs
    assert revs == sorted(set(revs))


async def test_corrupt_record_under_watched_prefix_is_reported_and_skipped(
    store: MetaStore, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    start = (await store.range(key_prefix)).revision + 1
    good = DeploymentSpec(name="good", model="smollm2")
    await store.put(key_prefix + "good", good.encode())
    await store.put(key_prefix + "bad", b'{"name": "bad", "model":')  # truncated JSON
    await store.put(key_prefix + "wrong", b'{"name": "NOT VALID!", "model": "m"}')
    await store.put(key_prefix + "later", DeploymentSpec(name="later", model="m").encode())
    watch = store.watch(key_prefix, start_revision=start)
    with caplog.at_level(logging.WARNING, logger="deepinfer_nb.store"):
        events = await take(watch, 4)
        records = [decode_record(DeploymentSpec, e.key, e.value) for e in events]
    await watch.aclose()
    assert [r.name if r else None for r in records] == ["good", None, None, "later"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert key_prefix + "bad" in warned and key_prefix + "wrong" in warned


async def test_compacted_watch_raises_then_resyncs(store: MetaStore, key_prefix: str) -> None:
    old = await store.put(key_prefix + "a", b"1")
    await store.put(key_prefix + "a", b"2")
    latest = await store.put(key_prefix + "b", b"3")
    await store.compact(latest)
    watch = store.watch(key_prefix, start_revision=old)
    with pytest.raises(RevisionCompactedError) as info:
        await take(watch, 1)
    assert info.value.compact_revision == latest
    # Resync as a caller must: re-read the prefix, resume after its header revision.
    snapshot = await store.range(key_prefix)
    assert {kv.key: kv.value for kv in snapshot.items} == {
        key_prefix + "a": b"2",
        key_prefix + "b": b"3",
    }
    watch = store.watch(key_prefix, start_revision=snapshot.revision + 1)
    rev = await store.put(key_prefix + "c", b"4")
    [ev] = await take(watch, 1)
    await watch.aclose()
    assert (ev.key, ev.revision) == (key_prefix + "c", rev)


async def test_close_ends_open_watches(store: MetaStore, key_prefix: str) -> None:
    watch = store.watch(key_prefix)
    await asyncio.sleep(0.1)
    await store.close()
    assert await take_all(watch) == []


async def take_all(watch: AsyncIterator[WatchEvent]) -> list[WatchEvent]:
    return [ev async for ev in watch]


# ---- leases -------------------------------------------------------------------------------------


async def test_lease_without_keepalive_expires_with_delete_event(
    store: MetaStore, key_prefix: str
) -> None:
    kept = await store.grant_lease(2)
    dying = await store.grant_lease(2)
    lost_calls: list[int] = []
    dying.on_lost(lambda: lost_calls.append(dying.id))
    start = await store.put(key_prefix + "kept", b"k", lease=kept.id)
    await store.put(key_prefix + "dying", b"d", lease=dying.id)
    kv = await store.get(key_prefix + "dying")
    assert kv is not None and kv.lease == dying.id
    watch = store.watch(key_prefix, start_revision=start + 2)
    stopped = time.monotonic()
    dying.stop_keepalive()
    [ev] = await take(watch, 1, timeout=4)
    gone_after = time.monotonic() - stopped
    await watch.aclose()
    assert (ev.type, ev.key) == (EventType.DELETE, key_prefix + "dying")
    assert gone_after <= 2 + 1, f"lease key outlived TTL + 1 s: {gone_after:.2f} s"
    assert await store.get(key_prefix + "dying") is None
    # The kept lease is past its 2 s TTL by now: only the keepalive holds it.
    await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - stopped)))
    assert await store.get(key_prefix + "kept") is not None and not kept.lost
    for _ in range(30):  # `lost` is learnt by the probe shortly after expiry
        if lost_calls:
            break
        await asyncio.sleep(0.1)
    assert dying.lost and lost_calls == [dying.id]


async def test_revoke_deletes_keys_and_is_not_a_loss(store: MetaStore, key_prefix: str) -> None:
    lease = await store.grant_lease(30)
    called: list[bool] = []
    lease.on_lost(lambda: called.append(True))
    await store.put(key_prefix + "a", b"1", lease=lease.id)
    await store.put(key_prefix + "b", b"2", lease=lease.id)
    await lease.revoke()
    assert (await store.range(key_prefix)).items == []
    with pytest.raises(LeaseLostError):
        await store.put(key_prefix + "c", b"3", lease=lease.id)
    assert called == [] and not lease.lost


# ---- etcd only ----------------------------------------------------------------------------------


@pytest.mark.etcd
async def test_watch_survives_sigkill_and_restart(
    etcd_restarted: LocalEtcd, etcd_store: MetaStore, key_prefix: str
) -> None:
    server, store = etcd_restarted, etcd_store
    start = (await store.range(key_prefix)).revision + 1
    watch = store.watch(key_prefix, start_revision=start)
    before = [await store.put(f"{key_prefix}before{i}", b"b") for i in range(5)]
    await take(watch, 2)  # the watch is live and delivering when the server dies

    server.kill()
    # Writes while etcd is down are retried until it is back.
    during = asyncio.create_task(_put_all(store, [f"{key_prefix}during{i}" for i in range(3)]))
    await asyncio.sleep(0.7)
    assert not during.done()
    await asyncio.to_thread(server.restart)
    during_revs = await asyncio.wait_for(during, 10)
    after = [await store.put(f"{key_prefix}after{i}", b"a") for i in range(3)]

    events = await take(watch, 3 + 3 + 3)  # the remaining before* + during* + after*
    await watch.aclose()
    expected = before[2:] + during_revs + after
    assert [e.revision for e in events] == expected
    assert [e.key.rsplit("/", 1)[1] for e in events] == (
        [f"before{i}" for i in range(2, 5)]
        + [f"during{i}" for i in range(3)]
        + [f"after{i}" for i in range(3)]
    )


async def _put_all(store: MetaStore, keys: list[str]) -> list[int]:
    return [await store.put(k, b"d") for k in keys]


@pytest.mark.etcd
async def test_lease_lost_when_refresh_says_expired(etcd_store: MetaStore) -> None:
    assert isinstance(etcd_store, EtcdStore)
    lease = await etcd_store.grant_lease(3)
    lost = asyncio.Event()
    lease.on_lost(lost.set)
    await etcd_store._revoke(lease.id)  # behind the lease object's back: the next refresh fails
    await asyncio.wait_for(lost.wait(), 3)
    assert lease.lost


@pytest.mark.etcd
async def test_calls_fail_naming_the_endpoint_after_the_retry_deadline() -> None:
    port = free_port()
    store = open_store(f"etcd://127.0.0.1:{port}", retry_deadline_s=0.5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{port}"):
        await store.put("/k", b"v")
    assert 0.3 < time.monotonic() - started < 3
    # counted for /metrics (deepinfer_store_retries_total, deepinfer_store_errors_total)
    assert store.counters.retries >= 1 and store.counters.failures == 1
    await store.close()


async def test_fail_fast_keeps_a_reachable_store_working(store: MetaStore) -> None:
    store.fail_fast()
    await store.put("/ff/k", b"v")
    kv = await store.get("/ff/k")
    assert kv is not None and kv.value == b"v"


@pytest.mark.etcd
async def test_fail_fast_gives_up_on_an_unreachable_store_in_seconds() -> None:
    port = free_port()
    store = open_store(f"etcd://127.0.0.1:{port}")  # retries 10 s by default
    store.fail_fast()
    with pytest.raises(StoreUnavailableError, match=r"kept failing for (0|1|2)\.\d s"):
        await store.put("/k", b"v")
    await store.close()


@pytest.mark.etcd
async def test_lease_lost_when_no_refresh_succeeds_for_a_ttl(
    etcd_restarted: LocalEtcd, etcd_store: MetaStore
) -> None:
    lease = await etcd_store.grant_lease(2)
    lost = asyncio.Event()
    lease.on_lost(lost.set)
    etcd_restarted.kill()
    killed = time.monotonic()
    await asyncio.wait_for(lost.wait(), 4)
    assert lease.renewal_failures >= 1  # (deepinfer_worker_lease_renewal_failures_total)
    # Lost once a whole TTL passed since the last good refresh (at most ttl/3 before the kill),
    # not on the first failed refresh.
    assert time.monotonic() - killed >= 2 - 2 / 3 and lease.lost
    await asyncio.to_thread(etcd_restarted.restart)
