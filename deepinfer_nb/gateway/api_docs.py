"""The gateway's API docs page at `/docs`: FastAPI's Swagger UI, with its assets served by the
gateway itself so the page works on a host without internet access.

Swagger UI's script, stylesheet and icon come from the `fastapi-offline` package (Swagger UI 5,
which renders the OpenAPI 3.1 document FastAPI writes; `swagger-ui-bundle`'s Swagger UI 4.15 only
says "Unable to render this definition" for it) and are served under `/docs/static/`. Under
`/docs` they need what `/docs` needs (the security middleware's scope goes by path: admin when
keys are set). Every URL on the page is relative (`openapi.json`, `docs/static/...`), so it
resolves against the gateway's root wherever the page is served: on loopback or under a proxy
prefix such as `/user/alice/proxy/8082/` (jupyter-server-proxy), where FastAPI's own page would
ask for `/openapi.json` at the notebook server's root. Without the package (a minimal install)
the page loads Swagger UI from FastAPI's CDN, as FastAPI does, and a log line says so.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS", "asset_folder", "install"]

log = logging.getLogger(__name__)

PACKAGE = "fastapi-offline"
_MODULE = "fastapi_offline"
ASSETS = "/docs/static"
"""Where the assets are mounted: under /docs, so they share its access rule."""
_FILES = {
    "swagger_js_url": "swagger-ui-bundle.js",
    "swagger_css_url": "swagger-ui.css",
    "swagger_favicon_url": "favicon.png",
}


def asset_folder() -> Path | None:
    """The installed package's folder of Swagger UI assets, or None without it (or without one
    of the files this page uses). Found without importing the package."""
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / f).is_file() for f in _FILES.values()) else None


def install(app: FastAPI) -> None:
    """Add `/docs` to `app`, and its assets when they are installed."""
    folder = asset_folder()
    urls: dict[str, Any] = {}  # get_swagger_ui_html's defaults: the CDN
    if folder is None:
        log.warning(
            "Swagger UI's files are not installed, so the API docs page /docs loads them from "
            "cdn.jsdelivr.net and stays blank on a host without internet access: "
            "`pip install %s` (in deepinfer-nb's `gateway` extra) serves them from the gateway",
            PACKAGE,
        )
    else:
        app.mount(ASSETS, StaticFiles(directory=folder), name="docs-static")
        urls = {arg: f"{ASSETS.lstrip('/')}/{name}" for arg, name in _FILES.items()}

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="openapi.json",
            title=f"{request.app.title} - API docs",
            oauth2_redirect_url=None,
            **urls,
        )
