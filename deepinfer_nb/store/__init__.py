"""The metadata store: `MetaStore` (base), `open_store(url)`, the memory and etcd backends.

`open_store` picks the backend by URL scheme: `memory://[?history=N]` (embedded, in-process) or
`etcd://HOST:PORT[,HOST:PORT...]` (a real etcd v3 cluster; TLS and credentials as keyword options
named like `config.StorageSettings`: etcd_ca_cert, etcd_cert, etcd_key, etcd_user, etcd_password).
`decode_record` is the one way watchers turn stored bytes into records: a corrupt value is logged
with its key and skipped (None), never raised into the watch loop; `decode_records` does it for a
prefix read whole, by key name.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Iterable
from typing import Any, TypeVar

from ..errors import ConfigError, RecordError
from ..models import Record, decode
from . import keys
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

__all__ = [
    "Compare",
    "Delete",
    "EventType",
    "KeyValue",
    "Lease",
    "MetaStore",
    "Put",
    "RangeResult",
    "TxnResult",
    "WatchEvent",
    "decode_record",
    "decode_records",
    "open_store",
]

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)


def open_store(url: str, **opts: Any) -> MetaStore:
    """A store for `url`; `opts` go to the backend (see the module docstring)."""
    scheme, sep, _ = url.partition("://")
    if scheme == "memory" and sep:
        from .memory import MemoryStore

        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        if "history" in query:
            try:
                opts.setdefault("history", int(query["history"][0]))
            except ValueError:
                raise ConfigError(f"{url}: history must be an integer") from None
        return MemoryStore(url, **opts)
    if scheme == "etcd" and sep:
        from .etcd import EtcdStore

        return EtcdStore(url, **opts)
    raise ConfigError(
        f"unknown store URL {url!r}: use memory:// (embedded) or etcd://HOST:PORT[,HOST:PORT]"
    )


def decode_records(cls: type[R], items: Iterable[KeyValue], prefix: str) -> dict[str, R]:
    """The records directly under `prefix` among `items` (a range's result), by key name; corrupt
    ones are logged and skipped, as `decode_record` does."""
    return {
        name: record
        for kv in items
        if (name := keys.name_of(kv.key, prefix))
        and (record := decode_record(cls, kv.key, kv.value)) is not None
    }


def decode_record(cls: type[R], key: str, value: bytes) -> R | None:
    """`models.decode`, except that a corrupt record is logged (naming the key) and skipped."""
    try:
        return decode(cls, key, value)
    except RecordError as exc:
        log.warning("skipping %s", exc)
        return None
