"""`build_app`: the gateway's FastAPI application over one metadata store.

Wires the routing table and the cluster metrics poll (started and stopped by the app's
lifespan), the serving layer, the metrics registry, the routers, the error handlers and the
security middleware. The app holds no global state: several gateways can live in one process
(tests, a notebook next to a CLI).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from .._version import __version__
from ..config import ApiKey, Settings
from ..engine.client import EngineClient
from ..engine.policy import LaunchPolicy
from ..store import MetaStore
from . import api_docs, cluster_routes, deployments, engine_logs, landing, openai_routes
from .activity import ActivityReporter
from .cluster_metrics import ClusterMetrics
from .errors import install_handlers
from .hold import HoldQueue
from .metrics import GatewayMetrics
from .openapi import openapi_schema
from .routing import ClientFactory, RoutingTable
from .security import SecurityMiddleware, as_keys
from .serving import OpenAIServing


def build_app(
    store: MetaStore,
    *,
    settings: Settings | None = None,
    api_keys: Sequence[str | ApiKey] = (),
    client_factory: ClientFactory = EngineClient,
) -> FastAPI:
    """The gateway app. `api_keys` turn on Bearer authentication with scopes (a bare string
    is a key with both scopes); deployments are checked against the launch policy that
    `settings.agent` describes."""
    settings = settings or Settings()
    keys = as_keys(api_keys)
    metrics = GatewayMetrics()
    table = RoutingTable(store, client_factory=client_factory, observer=metrics)
    server = settings.server
    hold = HoldQueue(
        table, store, timeout_s=server.hold_timeout_s, max_held=server.max_held_requests
    )
    activity = ActivityReporter(table, store, hold, interval_s=server.activity_interval_s)
    cluster = ClusterMetrics(table, store, interval_s=settings.server.metrics_interval_s)
    metrics.registry.register(cluster)
    metrics.registry.register(hold)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await table.start()
        activity.start()
        cluster.start()
        try:
            yield
        finally:
            await cluster.close()
            await activity.close()
            await hold.close()
            await table.close()

    # api_docs.py serves /docs with relative URLs and its own Swagger UI files (FastAPI's page
    # asks for /openapi.json, which misses under a proxy prefix, and for a CDN); no ReDoc
    app = FastAPI(
        title="deepinfer-nb gateway",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.store = store
    app.state.settings = settings
    app.state.table = table
    app.state.metrics = metrics
    app.state.hold = hold
    app.state.cluster_metrics = cluster
    app.state.serving = OpenAIServing(table, metrics, hold=hold, activity=activity)
    app.state.auth_enabled = bool(keys)
    app.state.keys = keys  # the landing page names the one a client should use
    app.state.log_source = None  # a worker in the same process sets itself (engine_logs)
    app.state.policy = LaunchPolicy.from_settings(settings.agent)
    install_handlers(app)
    app.router.routes[:0] = openai_routes.GENERATION_ROUTES  # first: they are matched most
    for module in (openai_routes, deployments, cluster_routes, engine_logs, landing):
        app.include_router(module.router)
    api_docs.install(app)
    app.add_middleware(
        SecurityMiddleware,
        api_keys=keys,
        metrics_open=settings.server.metrics_open,
        max_body_bytes=settings.server.max_body_bytes,
    )
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app
