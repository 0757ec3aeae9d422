"""`etcd://h:p[,h:p...]`: the MetaStore over a real etcd v3 cluster, built on aetcd's v3 API.

aetcd 1.0's `Client` dials one endpoint without TLS, drops the header revision of transactions and
cannot resume a watch, so this module drives aetcd's generated etcd v3 stubs (`aetcd.rpc`) over a
grpc.aio channel of its own and adds what the library lacks:

- retry with exponential backoff while etcd is briefly down (connection refused, no leader), up to
  a deadline, then `StoreUnavailableError` naming the endpoints; writes are retried only on
  UNAVAILABLE (the request never reached a server), reads also on timeouts; with several endpoints
  each retry moves to the next one;
- watches that reconnect and resume from the last delivered revision + 1 (nothing lost or
  repeated); a compacted start revision raises `RevisionCompactedError`;
- a background lease keepalive every ttl/3: the lease is lost when a refresh answers TTL <= 0 or
  none succeeds for a whole TTL, and `on_lost` callbacks run once;
- optional TLS (CA, client cert/key) and user/password auth, re-authenticating when a restarted
  server forgets the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aetcd import rpc

from ..errors import (
    ConfigError,
    LeaseLostError,
    RevisionCompactedError,
    StoreError,
    StoreUnavailableError,
    is_temporary,
)
from ._util import END, LostCallback, QueueWatch, fire_lost_callbacks, prefix_range_end
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

T = TypeVar("T")
DEFAULT_PORT = 2379
_BACKOFF_START_S = 0.05
_BACKOFF_MAX_S = 1.0
# after fail_fast(): enough to ride out a leader election, not an outage
_FAIL_FAST_RETRY_S = 2.0
_FAIL_FAST_CALL_S = 2.0
# Short reconnect backoff: gRPC's default grows to 2 minutes, far past our retry deadline.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


def parse_endpoints(url: str) -> list[str]:
    """`etcd://a:1,b` -> ["a:1", "b:2379"]."""
    if not url.startswith("etcd://"):
        raise ConfigError(f"not an etcd URL: {url!r} (expected etcd://HOST:PORT[,HOST:PORT])")
    rest = url[len("etcd://") :].strip("/")
    endpoints = []
    for part in filter(None, (p.strip() for p in rest.split(","))):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", str(DEFAULT_PORT))
        if not host or not port.isdigit():
            raise ConfigError(f"bad etcd endpoint {part!r} in {url!r} (expected HOST:PORT)")
        endpoints.append(f"{host}:{port}")
    if not endpoints:
        raise ConfigError(f"no endpoints in {url!r} (expected etcd://HOST:PORT[,HOST:PORT])")
    return endpoints


def _key_range(prefix: str) -> tuple[bytes, bytes]:
    key = prefix.encode()
    return (key or b"\0"), prefix_range_end(key)


def _to_kv(kv: Any) -> KeyValue:
    return KeyValue(
        key=kv.key.decode(),
        value=bytes(kv.value),
        create_revision=kv.create_revision,
        mod_revision=kv.mod_revision,
        version=kv.version,
        lease=kv.lease,
    )


@dataclasses.dataclass
class _Connection:
    endpoint: str
    channel: grpc.aio.Channel
    metadata: tuple[tuple[str, str], ...] | None

    def __post_init__(self) -> None:
        self.kv = rpc.KVStub(self.channel)
        self.watch = rpc.WatchStub(self.channel)
        self.lease = rpc.LeaseStub(self.channel)


class EtcdStore(MetaStore):
    """MetaStore over etcd v3. Create and use it on one asyncio loop."""

    def __init__(
        self,
        url: str,
        *,
        etcd_ca_cert: str = "",
        etcd_cert: str = "",
        etcd_key: str = "",
        etcd_user: str = "",
        etcd_password: str = "",
        retry_deadline_s: float = 10.0,
        call_timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.endpoints = parse_endpoints(url)
        self.retry_deadline_s = retry_deadline_s
        self.call_timeout_s = call_timeout_s
        self._credentials = _tls_credentials(etcd_ca_cert, etcd_cert, etcd_key)
        if bool(etcd_user) != bool(etcd_password):
            raise ConfigError("etcd auth needs both a user and a password")
        self._user, self._password = etcd_user, etcd_password
        self._current = 0
        self._conns: dict[str, _Connection] = {}
        self._watches: set[EtcdWatch] = set()
        self._leases: set[EtcdLease] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    # ---- connection and retry ------------------------------------------------------------------

    async def _connection(self) -> _Connection:
        endpoint = self.endpoints[self._current]
        conn = self._conns.get(endpoint)
        if conn is None:
            conn = await self._open(endpoint)
            self._conns[endpoint] = conn
        return conn

    async def _open(self, endpoint: str) -> _Connection:
        if self._credentials is not None:
            channel = grpc.aio.secure_channel(endpoint, self._credentials, _CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.insecure_channel(endpoint, _CHANNEL_OPTIONS)
        metadata = None
        if self._user:
            try:
                resp = await rpc.AuthStub(channel).Authenticate(
                    rpc.AuthenticateRequest(name=self._user, password=self._password),
                    timeout=self.call_timeout_s,
                )
            except BaseException:
                await channel.close()
                raise
            metadata = (("token", resp.token),)
        return _Connection(endpoint, channel, metadata)

    async def _forget(self, conn: _Connection) -> None:
        if self._conns.get(conn.endpoint) is conn:
            del self._conns[conn.endpoint]
        await conn.channel.close()

    def _rotate(self) -> None:
        self._current = (self._current + 1) % len(self.endpoints)

    def _error(self, exc: grpc.aio.AioRpcError, what: str, *, idempotent: bool) -> StoreError:
        """The etcd boundary's table: a failed call's status -> the store exception; whether it
        is temporary is the only thing retry loops look at."""
        code, detail = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            return StoreUnavailableError(f"etcd: {what}: {detail}")
        if code == grpc.StatusCode.UNAUTHENTICATED and self._user:
            # a restarted etcd forgets simple tokens: re-authenticate and retry
            return StoreUnavailableError(f"etcd: {what}: auth token expired: {detail}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and idempotent:
            # a write that timed out may have been applied: only reads are sent again
            return StoreUnavailableError(f"etcd: {what}: timed out: {detail}")
        if code == grpc.StatusCode.NOT_FOUND and "lease" in detail:
            return LeaseLostError(f"etcd: {what}: {detail}")
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in detail:
            return RevisionCompactedError(f"etcd: {what}: {detail}")
        return StoreError(f"etcd: {what} failed: {code.name}: {detail}")

    def _unavailable(self, what: str, waited: float, exc: BaseException) -> StoreUnavailableError:
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        return StoreUnavailableError(
            f"etcd at {','.join(self.endpoints)} unreachable: {what} kept failing for "
            f"{waited:.1f} s ({detail})"
        )

    async def _call(
        self, what: str, fn: Callable[[_Connection], Awaitable[T]], *, idempotent: bool
    ) -> T:
        """Run `fn` on a connection, retrying with backoff up to the retry deadline."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = _BACKOFF_START_S
        while True:
            self._check_open()
            conn: _Connection | None = None
            try:
                conn = await self._connection()
                return await fn(conn)
            except grpc.aio.AioRpcError as exc:
                error = self._error(exc, what, idempotent=idempotent)
                if not is_temporary(error):
                    self.counters.failures += 1
                    raise error from None
                if conn is not None and exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    await self._forget(conn)
                failure = exc
            waited = loop.time() - started
            if waited + delay > self.retry_deadline_s:
                self.counters.failures += 1
                raise self._unavailable(what, waited, failure)
            self.counters.retries += 1
            self._rotate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    # ---- key-value -------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        async def op(c: _Connection) -> Any:
            return await c.kv.Range(
                rpc.RangeRequest(key=key.encode()), timeout=self.call_timeout_s, metadata=c.metadata
            )

        resp = await self._call(f"get {key}", op, idempotent=True)
        return _to_kv(resp.kvs[0]) if resp.kvs else None

    async def range(self, prefix: str) -> RangeResult:
        start, end = _key_range(prefix)
        request = rpc.RangeRequest(
            key=start,
            range_end=end,
            sort_order=rpc.RangeRequest.ASCEND,
            sort_target=rpc.RangeRequest.KEY,
        )

        async def op(c: _Connection) -> Any:
            return await c.kv.Range(request, timeout=self.call_timeout_s, metadata=c.metadata)

        resp = await self._call(f"range {prefix}", op, idempotent=True)
        return RangeResult(items=[_to_kv(kv) for kv in resp.kvs], revision=resp.header.revision)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        request = rpc.PutRequest(key=key.encode(), value=value, lease=lease)

        async def op(c: _Connection) -> Any:
            return await c.kv.Put(request, timeout=self.call_timeout_s, metadata=c.metadata)

        resp = await self._call(f"put {key}", op, idempotent=False)
        return int(resp.header.revision)

    async def _delete_range(self, what: str, key: bytes, range_end: bytes = b"") -> int:
        request = rpc.DeleteRangeRequest(key=key, range_end=range_end)

        async def op(c: _Connection) -> Any:
            return await c.kv.DeleteRange(request, timeout=self.call_timeout_s, metadata=c.metadata)

        resp = await self._call(what, op, idempotent=False)
        return int(resp.deleted)

    async def delete(self, key: str) -> bool:
        return await self._delete_range(f"delete {key}", key.encode()) > 0

    async def delete_prefix(self, prefix: str) -> int:
        start, end = _key_range(prefix)
        return await self._delete_range(f"delete prefix {prefix}", start, end)

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> TxnResult:
        # The failure branch also reads the compared keys so a loser learns what won.
        reads = [rpc.RequestOp(request_range=rpc.RangeRequest(key=c.key.encode())) for c in compare]
        request = rpc.TxnRequest(
            compare=[_compare(c) for c in compare],
            success=[_request_op(op) for op in success],
            failure=[_request_op(op) for op in failure] + reads,
        )

        async def op(c: _Connection) -> Any:
            return await c.kv.Txn(request, timeout=self.call_timeout_s, metadata=c.metadata)

        resp = await self._call("txn on " + ",".join(c.key for c in compare), op, idempotent=False)
        current: dict[str, KeyValue | None] = {}
        if not resp.succeeded:
            for cmp, r in zip(compare, resp.responses[len(failure) :], strict=True):
                kvs = r.response_range.kvs
                current[cmp.key] = _to_kv(kvs[0]) if kvs else None
        return TxnResult(succeeded=resp.succeeded, revision=resp.header.revision, current=current)

    async def compact(self, revision: int) -> None:
        request = rpc.CompactionRequest(revision=revision, physical=False)

        async def op(c: _Connection) -> Any:
            return await c.kv.Compact(request, timeout=self.call_timeout_s, metadata=c.metadata)

        await self._call(f"compact {revision}", op, idempotent=True)

    # ---- watch and leases ----------------------------------------------------------------------

    def watch(self, prefix: str, *, start_revision: int = 0) -> EtcdWatch:
        self._check_open()
        return EtcdWatch(self, prefix, start_revision)

    async def grant_lease(self, ttl: int, *, keepalive: bool = True) -> EtcdLease:
        async def op(c: _Connection) -> Any:
            return await c.lease.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl, ID=0),
                timeout=self.call_timeout_s,
                metadata=c.metadata,
            )

        resp = await self._call(f"grant lease ttl={ttl}", op, idempotent=False)
        if resp.error:
            raise StoreError(f"etcd refused a lease of {ttl} s: {resp.error}")
        return EtcdLease(self, resp.ID, resp.TTL, keepalive=keepalive)

    async def _refresh_once(self, lease_id: int, *, timeout: float) -> int:
        """One keepalive round trip, no retry (the keepalive loop decides); the new TTL."""
        conn = await self._connection()
        call = conn.lease.LeaseKeepAlive(
            iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=timeout, metadata=conn.metadata
        )
        try:
            async for reply in call:
                return int(reply.TTL)
        finally:
            call.cancel()
        raise StoreError(f"etcd closed the keepalive stream of lease {lease_id:x}")

    async def _time_to_live(self, lease_id: int) -> int:
        async def op(c: _Connection) -> Any:
            return await c.lease.LeaseTimeToLive(
                rpc.LeaseTimeToLiveRequest(ID=lease_id),
                timeout=self.call_timeout_s,
                metadata=c.metadata,
            )

        resp = await self._call(f"lease {lease_id:x} ttl", op, idempotent=True)
        return int(resp.TTL)

    async def _revoke(self, lease_id: int) -> None:
        async def op(c: _Connection) -> Any:
            return await c.lease.LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease_id),
                timeout=self.call_timeout_s,
                metadata=c.metadata,
            )

        with contextlib.suppress(LeaseLostError):  # already expired: its keys are gone too
            await self._call(f"revoke lease {lease_id:x}", op, idempotent=True)

    def fail_fast(self) -> None:
        # read afresh on every retry, so calls already retrying give up early too
        self.retry_deadline_s = min(self.retry_deadline_s, _FAIL_FAST_RETRY_S)
        self.call_timeout_s = min(self.call_timeout_s, _FAIL_FAST_CALL_S)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for lease in list(self._leases):
            lease._stop()
        for watch in list(self._watches):
            await watch.aclose()
        for task in list(self._background):
            task.cancel()
        for conn in list(self._conns.values()):
            await conn.channel.close()
        self._conns.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.url}: store is closed")


class EtcdWatch(QueueWatch):
    """A watch pumped by a task into a queue; it reconnects and resumes at last revision + 1."""

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int) -> None:
        super().__init__()
        self._store = store
        self.prefix = prefix
        self._task = asyncio.get_running_loop().create_task(self._pump(start_revision))
        store._watches.add(self)

    async def aclose(self) -> None:
        self._store._watches.discard(self)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _pump(self, start_revision: int) -> None:
        try:
            await self._follow(start_revision)
        except asyncio.CancelledError:
            self._queue.put_nowait(END)
            raise
        except Exception as exc:
            self._queue.put_nowait(exc)
        self._store._watches.discard(self)

    async def _follow(self, next_rev: int) -> None:
        store = self._store
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        delay = _BACKOFF_START_S
        while True:
            failure: BaseException = StoreError("watch stream ended")
            try:
                conn = await store._connection()
                async with contextlib.aclosing(self._stream(conn, next_rev)) as stream:
                    async for resp in stream:
                        if resp.created:
                            failing_since, delay = None, _BACKOFF_START_S
                            if next_rev == 0:
                                next_rev = resp.header.revision + 1
                        next_rev = self._deliver(resp, next_rev)
            except grpc.aio.AioRpcError as exc:
                error = store._error(exc, f"watch {self.prefix}", idempotent=True)
                if not is_temporary(error):
                    raise error from None
                failure = exc
            now = loop.time()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since + delay > store.retry_deadline_s:
                raise store._unavailable(f"watch {self.prefix}", now - failing_since, failure)
            store._rotate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    async def _stream(self, conn: _Connection, start_revision: int) -> AsyncGenerator[Any, None]:
        start, end = _key_range(self.prefix)
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=start, range_end=end, start_revision=start_revision, prev_kv=True
            )
        )
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield create
            await stop.wait()  # keep the request side open: closing it ends the watch

        call = conn.watch.Watch(requests(), metadata=conn.metadata)
        try:
            async for resp in call:
                yield resp
        finally:
            stop.set()
            call.cancel()

    def _deliver(self, resp: Any, next_rev: int) -> int:
        """Queue the response's events not seen yet; the next revision to ask for."""
        if resp.compact_revision:
            raise RevisionCompactedError(
                f"etcd: watch on {self.prefix!r} from revision {next_rev} is compacted "
                f"(history starts at {resp.compact_revision}): re-read the prefix",
                compact_revision=resp.compact_revision,
            )
        if resp.canceled:
            raise StoreError(f"etcd cancelled the watch on {self.prefix!r}: {resp.cancel_reason}")
        # Events of one revision arrive in one response, so filter against its start only.
        floor = next_rev
        for ev in resp.events:
            if ev.kv.mod_revision < floor:
                continue
            delete = ev.type == rpc.Event.DELETE
            prev = bytes(ev.prev_kv.value) if ev.HasField("prev_kv") else None
            self._queue.put_nowait(
                WatchEvent(
                    type=EventType.DELETE if delete else EventType.PUT,
                    key=ev.kv.key.decode(),
                    value=b"" if delete else bytes(ev.kv.value),
                    revision=ev.kv.mod_revision,
                    prev_value=prev,
                )
            )
            next_rev = max(next_rev, ev.kv.mod_revision + 1)
        return next_rev


class EtcdLease(Lease):
    """A granted etcd lease with the background keepalive aetcd lacks."""

    def __init__(self, store: EtcdStore, lease_id: int, ttl: int, *, keepalive: bool) -> None:
        self.id = lease_id
        self.ttl = ttl
        self._store = store
        self._lost = False
        self._callbacks: list[LostCallback] = []
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._keepalive() if keepalive else self._probe())
        store._leases.add(self)

    @property
    def lost(self) -> bool:
        return self._lost

    def on_lost(self, callback: LostCallback) -> None:
        self._callbacks.append(callback)

    async def revoke(self) -> None:
        self._stop()
        await self._store._revoke(self.id)

    def stop_keepalive(self) -> None:
        if self._lost or self._task.done():
            return
        self._task.cancel()
        # Nobody refreshes it now: look at etcd after the TTL so `lost` and on_lost still work.
        self._task = asyncio.get_running_loop().create_task(self._probe())

    def _stop(self) -> None:
        self._task.cancel()
        self._store._leases.discard(self)

    def _mark_lost(self) -> None:
        self._lost = True
        self._store._leases.discard(self)
        fire_lost_callbacks(self._callbacks, self._store._background)

    async def _keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                ttl = await self._store._refresh_once(self.id, timeout=max(interval, 0.5))
            except (grpc.aio.AioRpcError, StoreError, OSError):
                self.renewal_failures += 1
                if loop.time() - last_ok >= self.ttl:
                    self._mark_lost()
                    return
                continue
            if ttl <= 0:
                self.renewal_failures += 1
                self._mark_lost()
                return
            self.renewals += 1
            last_ok = loop.time()

    async def _probe(self) -> None:
        remaining = float(self.ttl)
        while True:
            await asyncio.sleep(remaining + 0.5)
            try:
                ttl = await self._store._time_to_live(self.id)
            except StoreError:
                continue
            if ttl <= 0:
                self._mark_lost()
                return
            remaining = float(ttl)


def _compare(cmp: Compare) -> Any:
    if cmp.target == "mod":
        return rpc.Compare(
            key=cmp.key.encode(),
            target=rpc.Compare.MOD,
            result=rpc.Compare.EQUAL,
            mod_revision=cmp.revision,
        )
    if cmp.target == "create":
        return rpc.Compare(
            key=cmp.key.encode(),
            target=rpc.Compare.CREATE,
            result=rpc.Compare.EQUAL,
            create_revision=cmp.revision,
        )
    raise StoreError(f"unknown compare target {cmp.target!r}")


def _request_op(op: Put | Delete) -> Any:
    if isinstance(op, Put):
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=op.key.encode(), value=op.value, lease=op.lease)
        )
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key.encode()))


def _tls_credentials(ca_cert: str, cert: str, key: str) -> grpc.ChannelCredentials | None:
    if not (ca_cert or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ConfigError("etcd TLS client auth needs both etcd_cert and etcd_key")

    def read(path: str) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read etcd TLS file {path}: {exc.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_cert), private_key=read(key), certificate_chain=read(cert)
    )
