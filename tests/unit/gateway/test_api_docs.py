"""The API docs page `/docs` on a real uvicorn on loopback: it names only the gateway's own
Swagger UI files by relative URLs, which answer here and resolve under a proxy prefix; they need
the same key as the page; without the files installed the page falls back to the CDN and says so
in the log."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Sequence
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
import pytest_asyncio

from deepinfer_nb.config import INFERENCE, ApiKey
from deepinfer_nb.gateway import GatewayServer, api_docs, build_app
from deepinfer_nb.store.memory import MemoryStore

from .fakes import FakeFleet

ADMIN_KEY = ApiKey("ops", "sk-admin")
INFERENCE_KEY = ApiKey("app", "sk-app", frozenset({INFERENCE}))
CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}


class Assets(HTMLParser):
    """The URLs a page makes the browser load: scripts, stylesheets, icons."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {"script": "src", "link": "href", "img": "src"}
        self.urls += [v for k, v in attrs if tag in names and k == names[tag] and v]


def assets_of(page: str) -> list[str]:
    parser = Assets()
    parser.feed(page)
    return parser.urls


@pytest_asyncio.fixture
async def store() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    yield store
    await store.close()


async def _served(store: MemoryStore, keys: Sequence[ApiKey] = ()) -> GatewayServer:
    app = build_app(store, api_keys=keys, client_factory=FakeFleet().factory)
    server = GatewayServer(app, host="127.0.0.1", port=0)
    await server.start()
    return server


async def test_the_page_loads_only_its_own_files_by_relative_urls(store: MemoryStore) -> None:
    server = await _served(store)
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            page = (await http.get("/docs")).text
            urls = assets_of(page)
            # the script, the stylesheet and the icon, none elsewhere, none from the root
            assert sorted(urls) == [
                "docs/static/favicon.png",
                "docs/static/swagger-ui-bundle.js",
                "docs/static/swagger-ui.css",
            ]
            assert "://" not in page and "url: 'openapi.json'" in page
            for url in urls:  # each answers as the browser resolves it against /docs
                reply = await http.get(urljoin(f"{server.url}/docs", url))
                assert reply.status_code == 200, url
                kind = reply.headers["content-type"].split(";")[0]
                assert kind in CONTENT_TYPES[url[url.rindex(".") :]], (url, kind)
            script = await http.get("/docs/static/swagger-ui-bundle.js")
            # Swagger UI 5: 4.x cannot render the OpenAPI 3.1 document FastAPI writes
            version = re.search(r'PACKAGE_VERSION:"(\d+)\.', script.text)
            assert "SwaggerUIBundle" in script.text and version and version.group(1) == "5"
            assert (await http.get("/openapi.json")).json()["openapi"].startswith("3.1")
    finally:
        await server.stop()
    # under jupyter-server-proxy's prefix the same URLs stay under the prefix
    proxied = "http://nb.example:8888/user/alice/proxy/9999/docs"
    assert {urlsplit(urljoin(proxied, u)).path.rsplit("/", 1)[0] for u in urls} == {
        "/user/alice/proxy/9999/docs/static"
    }


async def test_the_files_need_what_the_page_needs(store: MemoryStore) -> None:
    server = await _served(store, [ADMIN_KEY, INFERENCE_KEY])
    script = "/docs/static/swagger-ui-bundle.js"
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            for path in ("/docs", script):
                assert (await http.get(path)).status_code == 401, path
                app = {"Authorization": f"Bearer {INFERENCE_KEY.secret}"}
                assert (await http.get(path, headers=app)).status_code == 403, path
                ops = {"Authorization": f"Bearer {ADMIN_KEY.secret}"}
                assert (await http.get(path, headers=ops)).status_code == 200, path
            # the folder serves its files, not a listing
            assert (await http.get("/docs/static/", headers=ops)).status_code == 404
    finally:
        await server.stop()


async def test_without_the_files_the_page_uses_the_cdn_and_says_so(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(api_docs, "asset_folder", lambda: None)  # a minimal install
    with caplog.at_level(logging.WARNING, logger=api_docs.__name__):
        server = await _served(store)
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            docs = await http.get("/docs")
            assert (await http.get("/docs/static/swagger-ui-bundle.js")).status_code == 404
    finally:
        await server.stop()
    assert docs.status_code == 200 and "url: 'openapi.json'" in docs.text
    assert any(u.startswith("https://cdn.jsdelivr.net/") for u in assets_of(docs.text))
    said = caplog.text
    assert "cdn.jsdelivr.net" in said and "pip install fastapi-offline" in said
