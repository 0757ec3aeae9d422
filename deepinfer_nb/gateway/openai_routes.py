"""The OpenAI routes: parse the body, hand it to the serving layer, return what it returns.

Errors are not formatted here: they propagate to the handlers in `errors.py`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .errors import model_not_found
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
)
from .routing import RoutingTable
from .serving import OpenAIServing

router = APIRouter(tags=["openai"])


def _serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.serving
    return serving


def _table(request: Request) -> RoutingTable:
    table: RoutingTable = request.app.state.table
    return table


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _serving(request).chat(body, request)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _serving(request).completions(body, request)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    return await _serving(request).embeddings(body, request)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(
        data=[
            _card(spec.model_name, spec.model, spec.created_at)
            for spec in _table(request).serving()
        ]
    )


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> ModelCard:
    for spec in _table(request).serving():
        if model in (spec.model_name, spec.name):
            return _card(spec.model_name, spec.model, spec.created_at)
    raise model_not_found(model)


def _card(name: str, root: str, created: float) -> ModelCard:
    return ModelCard(id=name, root=root, created=int(created))
