"""The gateway's connection limit ([server] max_connections, the original deepinfer's key) and
its engine log route, on a real uvicorn on 127.0.0.1 over the memory store."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import httpx

from deepinfer_nb.config import Settings
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.gateway.engine_logs import read_lines
from deepinfer_nb.store.memory import MemoryStore

from .fakes import put_deployment, put_engine


async def test_max_connections_is_a_connection_limit() -> None:
    settings = Settings()
    settings.server.max_connections = 2
    store = MemoryStore()
    clients = [httpx.AsyncClient() for _ in range(3)]
    try:
        async with GatewayServer(store, settings=settings, host="127.0.0.1", port=0) as gw:
            first, second, third = clients
            # two clients hold their keep-alive connections open: the limit is reached
            assert (await first.get(gw.url + "/health")).status_code == 200
            assert (await second.get(gw.url + "/health")).status_code == 200
            assert (await third.get(gw.url + "/health")).status_code == 503
            await first.aclose()  # one connection closes: room for the third again
            for _ in range(50):
                if (await third.get(gw.url + "/health")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the freed connection was never given to the third")
    finally:
        for client in clients:
            await client.aclose()
        await store.close()


@dataclass
class _Worker:
    node_id: str
    folder: Path

    def log_path(self, engine_id: str) -> Path:
        return self.folder / f"{engine_id}.log"


async def test_engine_logs_tail_offset_and_elsewhere(tmp_path: Path) -> None:
    store = MemoryStore()
    await put_deployment(store, "smol")
    here = await put_engine(store, "smol", 0, node="n1")
    away = await put_engine(store, "smol", 1, node="n2")
    (tmp_path / f"{here.id}.log").write_text("one\ntwo\nthree\n")
    app = build_app(store)
    app.state.log_source = _Worker("n1", tmp_path)
    try:
        async with GatewayServer(app, host="127.0.0.1", port=0) as gw, httpx.AsyncClient() as c:
            tail = (await c.get(f"{gw.url}/v1/engines/{here.id}/logs?lines=2")).json()
            assert tail["lines"] == ["two", "three"] and tail["node"] == "n1"
            with (tmp_path / f"{here.id}.log").open("a") as f:
                f.write("four\nfive (partial")
            more = await c.get(f"{gw.url}/v1/engines/{here.id}/logs?offset={tail['offset']}")
            assert more.json()["lines"] == ["four"]  # the partial line waits for its newline
            elsewhere = await c.get(f"{gw.url}/v1/engines/{away.id}/logs")
            assert elsewhere.status_code == 404
            assert "runs on node n2" in elsewhere.json()["error"]["message"]
            missing = await c.get(f"{gw.url}/v1/engines/nope/logs")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == (
                "engine_not_found"
            )
    finally:
        await store.close()


def test_read_lines_starts_over_on_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "e.log"
    path.write_text("a\nb\n")
    assert read_lines(path, lines=10, offset=None) == (["a", "b"], 4)
    assert read_lines(path, lines=10, offset=4) == ([], 4)
    path.write_text("c\n")  # restarted engine, shorter file: the tail again
    assert read_lines(path, lines=10, offset=4) == (["c"], 2)
    assert read_lines(tmp_path / "none.log", lines=10, offset=None) == ([], 0)
