"""`GET /v1/engines/{id}/logs`: an engine's output, for gateways that run beside a worker.

A worker writes each engine's output to a file on its node (`Worker.log_path`). A gateway in
the same process (`deepinfer-nb up`, the notebook kernel) is given that worker as its
`log_source` and serves those files; an engine on another node is a 404 that says where its log
is. `?lines=N` answers the last N lines; `?offset=B` the complete lines written after byte B
(what `deepinfer-nb logs -f` polls with). Either way `offset` in the answer is where to go on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from fastapi import APIRouter, Query, Request

from ..models import Engine
from ..store import MetaStore, decode_record, keys
from .errors import APIError

router = APIRouter(tags=["cluster"])

MAX_READ_BYTES = 1 << 20


class LogSource(Protocol):
    """What the route needs from a local worker."""

    node_id: str

    def log_path(self, engine_id: str) -> Path: ...


def read_lines(path: Path, *, lines: int, offset: int | None) -> tuple[list[str], int]:
    """(lines, next offset): the last `lines` lines, or the complete lines after `offset`."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            if offset is None or offset > end:  # a new file (restart) starts over
                start = max(0, end - MAX_READ_BYTES)
            else:
                start = max(offset, end - MAX_READ_BYTES)
            f.seek(start)
            data = f.read(end - start)
    except FileNotFoundError:
        return [], 0
    if offset is not None and offset <= end:
        complete, _, _ = data.rpartition(b"\n")
        text = complete.decode(errors="replace")
        next_offset = start + len(complete) + (1 if complete else 0)
        return (text.split("\n") if complete else []), next_offset
    tail = data.decode(errors="replace").splitlines()
    return tail[-lines:] if lines > 0 else [], end


@router.get("/v1/engines/{engine_id}/logs")
async def engine_logs(
    engine_id: str,
    request: Request,
    lines: int = Query(default=100, ge=0, le=100_000),
    offset: int | None = Query(default=None, ge=0),
) -> dict[str, Any]:
    store: MetaStore = request.app.state.store
    kv = await store.get(keys.engine(engine_id))
    engine = decode_record(Engine, kv.key, kv.value) if kv is not None else None
    if engine is None:
        raise APIError(
            404, f"engine {engine_id} does not exist", param="engine_id", code="engine_not_found"
        )
    source: LogSource | None = request.app.state.log_source
    if source is None or engine.node != source.node_id:
        where = f"node {engine.node}" if engine.node else "no node yet"
        raise APIError(
            404,
            f"engine {engine_id} runs on {where}, not beside this gateway: read its log on "
            f"that host (logs/{engine_id}.log in its deepinfer-nb home)",
            param="engine_id",
            code="log_not_here",
        )
    text, next_offset = read_lines(source.log_path(engine_id), lines=lines, offset=offset)
    return {"engine": engine_id, "node": engine.node, "lines": text, "offset": next_offset}
