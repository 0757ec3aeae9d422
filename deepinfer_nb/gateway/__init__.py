"""The OpenAI-compatible gateway (FastAPI): protocol models, routers, routing table, metrics.

build_app(store, *, settings, api_keys)   the FastAPI app over one metadata store
GatewayServer(app, host=, port=)          uvicorn on the current event loop
(the standalone `deepinfer-nb gateway` composes it with a store in `services.ServiceSet`)
"""

from __future__ import annotations

from .app import build_app
from .server import GatewayServer

__all__ = ["GatewayServer", "build_app"]
