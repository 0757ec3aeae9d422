"""Unit tests of the store's pure parts: URL parsing, backend choice, memory history bounds."""

from __future__ import annotations

import pytest

from deepinfer_nb.errors import ConfigError, RevisionCompactedError, StoreError
from deepinfer_nb.store import open_store
from deepinfer_nb.store._util import prefix_range_end
from deepinfer_nb.store.etcd import EtcdStore, parse_endpoints
from deepinfer_nb.store.local_etcd import find_etcd_binary
from deepinfer_nb.store.memory import MemoryStore


def test_parse_endpoints() -> None:
    assert parse_endpoints("etcd://a:1,b, c:3/") == ["a:1", "b:2379", "c:3"]
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_endpoints("etcd://a:x")
    with pytest.raises(ConfigError, match="no endpoints"):
        parse_endpoints("etcd://")


def test_open_store_chooses_by_scheme() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    store = open_store("etcd://127.0.0.1:1,127.0.0.1:2")
    assert isinstance(store, EtcdStore) and store.endpoints == ["127.0.0.1:1", "127.0.0.1:2"]
    for url in ("redis://x", "127.0.0.1:2379", "memory:"):
        with pytest.raises(ConfigError, match="unknown store URL"):
            open_store(url)


def test_etcd_credentials_must_come_in_pairs(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(ConfigError, match="user and a password"):
        open_store("etcd://h:1", etcd_user="root")
    with pytest.raises(ConfigError, match="etcd_cert and etcd_key"):
        open_store("etcd://h:1", etcd_cert="/x.pem")
    with pytest.raises(ConfigError, match="cannot read etcd TLS file"):
        open_store("etcd://h:1", etcd_ca_cert="/does/not/exist.pem")


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/a/") == b"/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"") == b"\0"


async def test_memory_history_bound_behaves_as_compacted() -> None:
    store = open_store("memory://?history=3")
    first = await store.put("/k", b"0")
    for i in range(1, 5):
        await store.put("/k", str(i).encode())
    watch = store.watch("/", start_revision=first)
    with pytest.raises(RevisionCompactedError) as info:
        await watch.__anext__()
    assert info.value.compact_revision == first + 2  # the last 3 revisions are kept
    watch = store.watch("/", start_revision=first + 2)
    assert [(await watch.__anext__()).value for _ in range(3)] == [b"2", b"3", b"4"]
    await store.close()


async def test_memory_compact_rejects_future_and_past() -> None:
    store = open_store("memory://")
    rev = await store.put("/k", b"v")
    with pytest.raises(StoreError, match="future"):
        await store.compact(rev + 1)
    await store.compact(rev)
    with pytest.raises(RevisionCompactedError):
        await store.compact(rev)
    await store.close()


def test_missing_etcd_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(StoreError, match="apt-get install etcd-server"):
        find_etcd_binary()
