"""The landing page `/` and the docs page over a memory store, on a real uvicorn on loopback:
HTML and JSON, relative links (they must work under a proxy prefix), the examples' URL from a
proxy's forwarded prefix, and the key rules."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest_asyncio

from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.models import EngineState
from deepinfer_nb.store.memory import MemoryStore

from .fakes import FakeFleet, put_deployment, put_engine

KEY = "sk-landing"
JSON = {"Accept": "application/json"}


@pytest_asyncio.fixture
async def store() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    await put_deployment(store, "smol", served_model_name="smollm2")
    await put_engine(store, "smol", 0)
    await put_deployment(store, "qwen", model="Qwen/Qwen2.5-7B-Instruct", replicas=2)
    await put_engine(store, "qwen", 0, state=EngineState.STARTING)
    yield store
    await store.close()


async def _served(store: MemoryStore, keys: list[str]) -> GatewayServer:
    app = build_app(store, api_keys=keys, client_factory=FakeFleet().factory)
    server = GatewayServer(app, host="127.0.0.1", port=0)
    await server.start()
    return server


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs += [v for k, v in attrs if k == "href" and v]


async def test_json_lists_deployments_with_state_and_relative_urls(store: MemoryStore) -> None:
    server = await _served(store, [])
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            body = (await http.get("/", headers=JSON)).json()
    finally:
        await server.stop()
    rows = {d["name"]: d for d in body["deployments"]}
    assert rows["smol"]["model"] == "smollm2" and rows["smol"]["state"] == "Running"
    assert (rows["qwen"]["state"], rows["qwen"]["ready_replicas"], rows["qwen"]["replicas"]) == (
        "Starting",
        0,
        2,
    )
    assert body["openai_base_url"] == "v1" and body["links"]["docs"] == "docs"


async def test_html_links_are_relative_and_resolve(store: MemoryStore) -> None:
    server = await _served(store, [])
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            page = await http.get("/")
            assert page.headers["content-type"].startswith("text/html")
            parser = Links()
            parser.feed(page.text)
            assert parser.hrefs and not [h for h in parser.hrefs if h.startswith("/")]
            for href in parser.hrefs:  # every link answers where the page is served
                assert (await http.get("/" + href)).status_code == 200, href
            # the examples name the running model and a base URL that answers
            assert "smollm2" in page.text and f"{server.url}/v1/chat/completions" in page.text
            docs = await http.get("/docs")
            assert "url: 'openapi.json'" in docs.text or 'url: "openapi.json"' in docs.text
            assert (await http.get("/redoc")).status_code == 404
    finally:
        await server.stop()


async def test_examples_use_the_proxy_prefix(store: MemoryStore) -> None:
    server = await _served(store, [])
    # what jupyter-server-proxy sends: the prefix (three ways) and the notebook server's Host
    prefix = "/user/alice/proxy/9999"
    headers = {
        "X-Forwarded-Prefix": prefix,
        "X-ProxyContextPath": prefix,
        "Host": "nb.example:8888",
    }
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            page = html.unescape((await http.get("/", headers=headers)).text)
    finally:
        await server.stop()
    assert "http://nb.example:8888/user/alice/proxy/9999/v1/chat/completions" in page
    assert re.search(r"base_url='http://nb\.example:8888/user/alice/proxy/9999/v1'", page)
    assert 'api_key=os.environ["JUPYTER_TOKEN"]' in page  # the proxy wants the Jupyter token


def try_it_out(docs_page: str, schema: dict[str, Any], path: str) -> str:
    """The URL Swagger UI's "Try it out" requests: the first server resolved against the
    document's URL (itself relative to the docs page), as swagger-client's
    `buildOas3UrlWithContext` does, then the operation's path."""
    document = urljoin(docs_page, "openapi.json")
    server = schema.get("servers", [{"url": "/"}])[0]["url"]
    return urljoin(document, server).rstrip("/") + path


async def test_try_it_out_requests_stay_under_the_proxy_prefix(store: MemoryStore) -> None:
    server = await _served(store, [])
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            schema = (await http.get("/openapi.json")).json()
            direct = try_it_out(f"{server.url}/docs", schema, "/v1/models")
            assert direct == f"{server.url}/v1/models"
            assert (await http.get(direct)).json()["object"] == "list"
    finally:
        await server.stop()
    proxied = "http://nb.example:8888/user/alice/proxy/9999/docs"
    assert try_it_out(proxied, schema, "/v1/models") == (
        "http://nb.example:8888/user/alice/proxy/9999/v1/models"
    )
    # OpenAPI's default server "/" left the prefix out
    assert try_it_out(proxied, {}, "/v1/models") == "http://nb.example:8888/v1/models"


async def test_with_keys_the_page_needs_an_inference_key(store: MemoryStore) -> None:
    server = await _served(store, [KEY])
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/")).status_code == 401
            ok = await http.get("/", headers={**JSON, "Authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200 and len(ok.json()["deployments"]) == 2
            page = await http.get("/", headers={"Authorization": f"Bearer {KEY}"})
            assert "os.environ[&quot;DEEPINFER_API_KEY&quot;]" in page.text
            assert (await http.get("/docs")).status_code == 401  # docs stay admin
    finally:
        await server.stop()


async def test_an_empty_cluster_says_how_to_deploy() -> None:
    store = MemoryStore()
    server = await _served(store, [])
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            page = html.unescape((await http.get("/")).text)
    finally:
        await server.stop()
        await store.close()
    assert "%deepinfer deploy MODEL" in page and "'MODEL'" in page
