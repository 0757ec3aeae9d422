"""The gateway's landing page at `/`.

`/` lists the deployments (from the in-memory routing table: no store round trip) with their
state and OpenAI base URL, a copyable curl and Python example, and links to the docs and metrics;
`Accept: application/json` gets the same as JSON. Every link is relative (`v1`, `docs`,
`metrics`), so the page works wherever it is served: on loopback, or under a proxy prefix such as
`/user/alice/proxy/8082/` (jupyter-server-proxy); `/docs` (api_docs.py) does the same.
The absolute URL in the examples is taken from the proxy's `X-Forwarded-*` headers when present;
behind jupyter-server-proxy (it sends `X-ProxyContextPath`) they also send the Jupyter token.
"""

from __future__ import annotations

import html
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .._version import __version__
from ..models import DeploymentSpec, Engine, EngineState
from ..snippets import JUPYTER_TOKEN_ENV, snippet
from .routing import RoutingTable
from .security import client_key_hint

router = APIRouter(include_in_schema=False)

LINKS = {"docs": "docs", "metrics": "metrics", "health": "health", "models": "v1/models"}
EXAMPLE_MODEL = "MODEL"
"""The model an example names while nothing is deployed."""
_ORDER = [
    EngineState.RUNNING,
    EngineState.STARTING,
    EngineState.DOWNLOADING,
    EngineState.SCHEDULED,
    EngineState.PENDING,
]


IDLE = "Idle (scaled to zero)"
"""A deployment whose idle_timeout stopped its engines (the next request starts one)."""


def deployment_state(spec: DeploymentSpec, engines: list[Engine]) -> str:
    """One word for a deployment: its most advanced engine's state (Running if any runs)."""
    if not engines:
        return "Stopped" if spec.replicas == 0 else "Pending"
    states = {e.state for e in engines}
    best = next((s for s in _ORDER if s in states), None)
    return (best or engines[0].state).value


def summary(table: RoutingTable) -> list[dict[str, Any]]:
    rows = []
    for name, spec in sorted(table.deployments.items()):
        engines = table.engines_of(name)
        rows.append(
            {
                "name": name,
                "model": spec.model_name,
                "engine": spec.engine,
                "state": IDLE if table.is_idle(name) else deployment_state(spec, engines),
                "ready_replicas": sum(e.state is EngineState.RUNNING for e in engines),
                "replicas": spec.replicas,
                "openai_base_url": "v1",
            }
        )
    return rows


def public_base(request: Request) -> str:
    """The gateway's root as the caller reached it (through a proxy's forwarded prefix)."""
    headers = request.headers
    prefix = headers.get("x-forwarded-prefix", "").rstrip("/")
    host = headers.get("x-forwarded-host") or headers.get("host") or request.url.netloc
    scheme = headers.get("x-forwarded-proto") or request.url.scheme
    return f"{scheme}://{host}{prefix}/"


def _behind_jupyter(request: Request) -> bool:
    return "x-proxycontextpath" in request.headers


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


@router.get("/", response_model=None)
async def landing(request: Request) -> Response:
    table: RoutingTable = request.app.state.table
    rows = summary(table)
    if _wants_json(request):
        return JSONResponse(
            {
                "object": "gateway",
                "version": __version__,
                "openai_base_url": "v1",
                "deployments": rows,
                "links": LINKS,
            }
        )
    key_env, key_note = client_key_hint(request.app.state.keys)
    return HTMLResponse(
        page(
            rows,
            api_base=public_base(request) + "v1",
            key_env=key_env,
            key_note=key_note,
            token_env=JUPYTER_TOKEN_ENV if _behind_jupyter(request) else "",
        )
    )


def page(
    rows: list[dict[str, Any]],
    *,
    api_base: str,
    key_env: str = "",
    key_note: str = "",
    token_env: str = "",
) -> str:
    """The landing page's HTML (pure: tested without a server)."""
    creds = {"key_env": key_env, "key_note": key_note, "token_env": token_env}
    model = next((r["model"] for r in rows if r["state"] == "Running"), None)
    model = model or (rows[0]["model"] if rows else EXAMPLE_MODEL)
    examples = "".join(
        f"<h3>{title}</h3><pre><code class='{lang}'>"
        f"{html.escape(snippet(lang=lang, api_base=api_base, model=model, **creds))}</code></pre>"
        for title, lang in (("curl", "curl"), ("Python (openai)", "python"))
    )
    body = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td><code>{html.escape(r['model'])}</code></td>"
        f"<td>{html.escape(r['engine'])}</td><td class='state'>{html.escape(r['state'])}</td>"
        f"<td>{r['ready_replicas']}/{r['replicas']}</td>"
        f"<td><a href='{r['openai_base_url']}/models'>{r['openai_base_url']}</a></td></tr>"
        for r in rows
    )
    table = (
        "<table><tr><th>deployment</th><th>model</th><th>engine</th><th>state</th>"
        f"<th>ready</th><th>OpenAI base URL</th></tr>{body}</table>"
        if rows
        else "<p>No deployments yet: <code>%deepinfer deploy MODEL</code> in the notebook.</p>"
    )
    links = " · ".join(f"<a href='{href}'>{name}</a>" for name, href in LINKS.items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>deepinfer-nb gateway</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:60em}"
        "td,th{padding:.2em .8em;text-align:left}pre{background:#f4f4f4;padding:.8em}</style>"
        f"</head><body><h1>deepinfer-nb gateway</h1><p>OpenAI base URL: "
        f"<code id='api-base'>{html.escape(api_base)}</code> · {links}</p>"
        f"<h2>Deployments</h2>{table}<h2>Try it</h2>{examples}"
        f"<p><small>deepinfer-nb {html.escape(__version__)}</small></p></body></html>"
    )
