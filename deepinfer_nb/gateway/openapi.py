"""The gateway's OpenAPI document: FastAPI's, completed to say what the gateway really does.

FastAPI derives the schema from the route signatures, which leaves out or gets wrong what the
routes do by hand: the two generation routes are plain Starlette routes (not listed at all), the
deployments routes take and return plain dicts (any object), every error is an OpenAI
`ErrorResponse` (not FastAPI's `HTTPValidationError`, and invalid OpenAI bodies are 400, not 422),
and /metrics is Prometheus text. `openapi_schema(app)` patches those in, once, so clients and the
property-based API tests (tests/unit/gateway/test_api_fuzz.py) see the true contract.

The one server is "." (relative to where the document is served): Swagger UI's "Try it out" then
sends `{prefix}/v1/...` under a proxy prefix such as jupyter-server-proxy's, where OpenAPI's
default server "/" would send `/v1/...` to the notebook server's root.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ..models import DeploymentSpec, Engine, GpuSamples, Node, Placement
from .protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingResponse,
    ErrorResponse,
)

__all__ = ["openapi_schema"]

REF = "#/components/schemas/{model}"
JSON = "application/json"

# the statuses each kind of route answers besides 200 (see errors.py's table)
_GENERATION_ERRORS = ("400", "401", "404", "413", "502", "503", "504")
_ERRORS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": _GENERATION_ERRORS,
    "/v1/completions": _GENERATION_ERRORS,
    "/v1/embeddings": _GENERATION_ERRORS,
    "/v1/models/{model}": ("401", "404"),
    # 400: the body is not JSON; 422: it is, but not a valid deployment
    "/v1/deployments": ("400", "401", "409", "413", "422", "503"),
    "/v1/deployments/{name}": ("400", "401", "404", "409", "413", "422", "503"),
    "/v1/deployments/{name}/rollback": ("401", "404", "409", "422", "503"),
    "/v1/deployments/{name}/restart": ("401", "404", "422", "503"),
    "/v1/engines/{engine_id}/logs": ("400", "401", "404", "503"),
    "/health": ("503",),
}
_DEFAULT_ERRORS = ("401", "503")


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The completed schema, computed on first use and kept on the app (FastAPI's own cache)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, routes=app.routes, servers=[{"url": "."}]
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    paths = schema.setdefault("paths", {})
    paths["/v1/chat/completions"] = _generation(
        components,
        ChatCompletionRequest,
        ChatCompletionResponse,
        ChatCompletionChunk,
        "Create a chat completion",
    )
    paths["/v1/completions"] = _generation(
        components, CompletionRequest, CompletionResponse, CompletionResponse, "Create a completion"
    )
    paths["/v1/embeddings"]["post"]["responses"]["200"] = _json(_ref(components, EmbeddingResponse))
    _deployments(components, paths)
    _cluster_lists(components, paths)
    paths["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus exposition",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    _ref(components, ErrorResponse)
    for path, ops in paths.items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's HTTPValidationError: never sent
            for status in _ERRORS.get(path, _DEFAULT_ERRORS):
                responses[status] = {
                    "description": "an OpenAI error",
                    "content": {JSON: {"schema": {"$ref": REF.format(model="ErrorResponse")}}},
                }
    app.openapi_schema = schema
    return schema


def _ref(components: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    """Register `model` (and the models it uses) in the components; a $ref to it."""
    found = model.model_json_schema(ref_template=REF)
    for name, sub in found.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components.setdefault(model.__name__, found)
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _list_of(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": item}},
    }


def _generation(
    components: dict[str, Any],
    request: type[BaseModel],
    response: type[BaseModel],
    chunk: type[BaseModel],
    summary: str,
) -> dict[str, Any]:
    ok = _json(_ref(components, response), "the completion, or with stream=true its SSE chunks")
    # each event's data: a chunk, an in-band error once the stream has started, or [DONE]
    data = {
        "anyOf": [
            {"const": "[DONE]"},
            {
                "type": "string",
                "contentMediaType": JSON,
                "contentSchema": {
                    "anyOf": [_ref(components, chunk), _ref(components, ErrorResponse)]
                },
            },
        ]
    }
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    ok["content"]["text/event-stream"] = {"schema": event}
    return {
        "post": {
            "tags": ["openai"],
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": _ref(components, request)}},
            },
            "responses": {"200": ok},
        }
    }


def _deployments(components: dict[str, Any], paths: dict[str, Any]) -> None:
    spec = _ref(components, DeploymentSpec)
    _ref(components, Placement)
    engine = _ref(components, Engine)
    view = {
        "allOf": [
            spec,
            {
                "type": "object",
                "required": ["model_name", "ready_replicas", "message", "engines"],
                "properties": {
                    "model_name": {"type": "string"},
                    "ready_replicas": {"type": "integer", "minimum": 0},
                    "message": {"type": "string"},
                    "idle": {"type": "boolean", "description": "scaled to zero (idle_timeout)"},
                    "engines": {"type": "array", "items": engine},
                },
            },
        ]
    }
    fields = components["DeploymentSpec"]["properties"]
    settable = {k: v for k, v in fields.items() if k not in ("created_at", "schema_version")}
    # engine_args may also be a mapping of flags (see deployments.engine_args)
    settable["engine_args"] = {
        "anyOf": [
            {"type": "array", "items": {"type": "string"}},
            {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
        ]
    }
    # idle_timeout may also be a duration: "30s", "15m", "1h"
    settable["idle_timeout"] = {
        "anyOf": [
            {"type": "number", "exclusiveMinimum": 0},
            {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
            {"type": "null"},
        ],
        "description": fields["idle_timeout"].get("description", ""),
    }
    create = {
        "type": "object",
        "required": ["model"],
        "additionalProperties": False,
        "properties": settable,
    }
    patch = {
        "type": "object",
        "additionalProperties": False,
        "properties": {k: fields[k] for k in ("replicas", "max_restarts", "placement")},
    }
    listing, one = paths["/v1/deployments"], paths["/v1/deployments/{name}"]
    listing["get"]["responses"]["200"] = _json(_list_of(view))
    listing["post"]["requestBody"] = {"required": True, "content": {JSON: {"schema": create}}}
    listing["post"]["responses"] = {
        "200": _json(view, "the existing deployment (same spec)"),
        "201": _json(view, "created"),
    }
    one["get"]["responses"]["200"] = _json(view)
    one["patch"]["requestBody"] = {"required": True, "content": {JSON: {"schema": patch}}}
    one["patch"]["responses"]["200"] = _json(view)
    one["delete"]["responses"]["200"] = _json(
        {
            "type": "object",
            "required": ["name", "deleted"],
            "properties": {"name": {"type": "string"}, "deleted": {"const": True}},
        }
    )


def _cluster_lists(components: dict[str, Any], paths: dict[str, Any]) -> None:
    for path, model in (("/v1/engines", Engine), ("/v1/nodes", Node), ("/v1/gpus", GpuSamples)):
        paths[path]["get"]["responses"]["200"] = _json(_list_of(_ref(components, model)))
