"""The OpenAI routes: parse the body, hand it to the serving layer, return what it returns.

Errors are not formatted here: they propagate to the handlers in `errors.py`.

The two generation routes are plain Starlette routes (`GENERATION_ROUTES`), which the app puts
ahead of FastAPI's: they validate the raw body in one pydantic pass and skip FastAPI's
per-request dependency solving and body handling, about a sixth of the app's own CPU for a
short completion (measured in-process against a fake engine). FastAPI's OpenAPI page does not
list them; OpenAI's API reference documents them.
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.routing import Route

from ..models import DeploymentSpec
from .errors import model_not_found, validation_error
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


B = TypeVar("B", bound=BaseModel)


async def _body(request: Request, model: type[B]) -> B:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise validation_error(exc, status=400) from None


async def chat_completions(request: Request) -> Response:
    body = await _body(request, ChatCompletionRequest)
    return await _serving(request).chat(body, request)


async def completions(request: Request) -> Response:
    body = await _body(request, CompletionRequest)
    return await _serving(request).completions(body, request)


GENERATION_ROUTES = (
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    return await _serving(request).embeddings(body, request)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    serving = _serving(request)
    return ModelList(data=[await _card(serving, spec) for spec in _table(request).serving()])


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> ModelCard:
    for spec in _table(request).serving():
        if model in (spec.model_name, spec.name):
            return await _card(_serving(request), spec)
    raise model_not_found(model)


async def _card(serving: OpenAIServing, spec: DeploymentSpec) -> ModelCard:
    return ModelCard(
        id=spec.model_name,
        root=spec.model,
        created=int(spec.created_at),
        task=await serving.task(spec),
    )
