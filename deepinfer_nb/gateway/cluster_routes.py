"""Cluster and operations routes: engines, nodes, GPU samples, health, Prometheus metrics.

Read-only views of the store (engine auth tokens removed). `/health` answers
`{"status": "healthy", ...}` as the original deepinfer documents, with a store round trip so an
unreachable store shows as 503 "unhealthy".
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .._version import __version__
from ..errors import StoreError
from ..models import EngineState, GpuSamples, Node
from ..store import MetaStore, decode_record, keys
from .deployments import _engines, engine_view
from .metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from .routing import RoutingTable

router = APIRouter(tags=["cluster"])

HEALTH_STORE_TIMEOUT_S = 3.0


def _store(request: Request) -> MetaStore:
    store: MetaStore = request.app.state.store
    return store


@router.get("/v1/engines")
async def list_engines(request: Request, deployment: str | None = None) -> dict[str, Any]:
    engines = await _engines(_store(request), deployment)
    return {"object": "list", "data": [engine_view(e) for e in engines]}


@router.get("/v1/nodes")
async def list_nodes(request: Request) -> dict[str, Any]:
    result = await _store(request).range(keys.NODES)
    nodes = [
        n
        for kv in result.items
        if keys.name_of(kv.key, keys.NODES)
        and (n := decode_record(Node, kv.key, kv.value)) is not None
    ]
    return {
        "object": "list",
        "data": [n.model_dump(mode="json", exclude={"schema_version"}) for n in nodes],
    }


@router.get("/v1/gpus")
async def list_gpus(request: Request) -> dict[str, Any]:
    result = await _store(request).range(keys.NODES)
    samples = [
        s
        for kv in result.items
        if keys.is_node_gpus(kv.key)
        and (s := decode_record(GpuSamples, kv.key, kv.value)) is not None
    ]
    return {
        "object": "list",
        "data": [s.model_dump(mode="json", exclude={"schema_version"}) for s in samples],
    }


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    table: RoutingTable = request.app.state.table
    store = _store(request)
    started = time.perf_counter()
    try:
        await asyncio.wait_for(store.get(keys.LEADER + "controller"), HEALTH_STORE_TIMEOUT_S)
        store_state: dict[str, Any] = {
            "url": store.url,
            "connected": True,
            "latency_ms": round(1000 * (time.perf_counter() - started), 2),
        }
    except (StoreError, asyncio.TimeoutError, OSError) as exc:
        store_state = {"url": store.url, "connected": False, "error": str(exc) or "timeout"}
    running = sum(1 for e in table.engines.values() if e.state is EngineState.RUNNING)
    healthy = store_state["connected"]
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "version": __version__,
        "store": store_state,
        "routing_synced": table.synced,
        "deployments": len(table.deployments),
        "engines_running": running,
        "models": [spec.model_name for spec in table.serving()],
    }
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gm: GatewayMetrics = request.app.state.metrics
    return Response(gm.exposition(), media_type=CONTENT_TYPE_LATEST)
