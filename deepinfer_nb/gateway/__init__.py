"""The OpenAI-compatible gateway (FastAPI): protocol models, routers, routing table, metrics.

build_app(store, *, settings, api_keys)   the FastAPI app over one metadata store
GatewayServer(app, host=, port=)          uvicorn on the current event loop
serve(store_url, host=, port=, api_keys=) the standalone gateway (`deepinfer-nb gateway`)
"""

from __future__ import annotations

from .app import build_app
from .server import GatewayServer, serve

__all__ = ["GatewayServer", "build_app", "serve"]
