"""The deployments API: create, list, inspect, scale and delete `deployments/{name}` records.

The gateway writes only deployment records (the controller turns them into engines). POST takes
the original deepinfer body as is (`{"model", "engine", "device", "tensor_parallel_size",
"gpu_memory_utilization"}`) plus our fields (name, replicas, placement, engine_args, ...);
an invalid or unknown field is a 422 naming it, and so is a spec the launch policy refuses
(`engine/policy.py`; code "launch_policy", the message names the rule; the workers enforce the
same rules on whatever reaches the store). Creating is idempotent by name: the same spec
again answers 200 with the existing deployment, a different one 409. Records carry who created
and last changed them (`created_by` / `updated_by`: the API key's name). Responses show the
deployment with its engines' states, read from the store (not the routing table) so a client
sees its own write at once. Engine auth tokens, env values and secret flag values are never
returned.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..engine import policy
from ..models import DeploymentSpec, Engine, EngineState
from ..store import MetaStore, decode_record, keys
from .errors import APIError, validation_error
from .routing import unavailable_reason

router = APIRouter(tags=["deployments"])
JSONBody = Annotated[dict[str, Any], Body()]

_SERVER_FIELDS = frozenset({"created_at", "created_by", "updated_by", "schema_version"})
_PATCHABLE = frozenset({"replicas", "max_restarts", "placement"})
_ENGINE_HIDDEN = frozenset({"auth_token", "schema_version"})


def default_name(model: str) -> str:
    """A deployment name from a model id: "Qwen/Qwen2.5-7B-Instruct" -> "qwen2.5-7b-instruct"."""
    base = model.rstrip("/").rsplit("/", 1)[-1].lower()
    name = re.sub(r"[^a-z0-9._-]+", "-", base).strip("._-")[:63].strip("._-")
    return name or "model"


def engine_args(value: Any) -> Any:
    """Engine args as a CLI list; a mapping {"max_num_seqs": 8, "enable_prefix_caching": true}
    becomes ["--max-num-seqs", "8", "--enable-prefix-caching"]."""
    if not isinstance(value, dict):
        return value
    out: list[str] = []
    for key, v in value.items():
        flag = "--" + str(key).replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is not False and v is not None:
            out.extend([flag, str(v)])
    return out


def _unknown(fields: set[str], allowed: frozenset[str] | set[str], *, why: str) -> None:
    bad = sorted(fields - allowed)
    if bad:
        raise APIError(422, f"{bad[0]}: {why}", param=bad[0], code="validation_error")


def parse_spec(body: dict[str, Any]) -> DeploymentSpec:
    """A DeploymentSpec from a POST body, or a 422 naming the field at fault."""
    _unknown(set(body), set(DeploymentSpec.model_fields) - _SERVER_FIELDS, why="unknown field")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise APIError(
            422,
            "model: a model id, local folder or local model alias is required",
            param="model",
            code="validation_error",
        )
    data = dict(body)
    if "engine_args" in data:
        data["engine_args"] = engine_args(data["engine_args"])
    if not data.get("name"):
        data["name"] = default_name(data["model"])
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, status=422) from None


def engine_view(engine: Engine) -> dict[str, Any]:
    return engine.model_dump(mode="json", exclude=set(_ENGINE_HIDDEN))


def deployment_view(spec: DeploymentSpec, engines: list[Engine]) -> dict[str, Any]:
    out = spec.model_dump(mode="json", exclude={"schema_version"})
    out["env"] = {k: policy.REDACTED for k in spec.env}
    out["engine_args"] = policy.redact_args(spec.engine_args)
    ready = sum(1 for e in engines if e.state is EngineState.RUNNING)
    out["model_name"] = spec.model_name
    out["ready_replicas"] = ready
    out["message"] = "" if ready else unavailable_reason(spec, engines)
    out["engines"] = [engine_view(e) for e in engines]
    return out


async def _engines(store: MetaStore, deployment: str | None = None) -> list[Engine]:
    result = await store.range(keys.ENGINES)
    engines = [
        e for kv in result.items if (e := decode_record(Engine, kv.key, kv.value)) is not None
    ]
    if deployment is not None:
        engines = [e for e in engines if e.deployment == deployment]
    return sorted(engines, key=lambda e: (e.deployment, e.replica, e.id))


async def _get_spec(store: MetaStore, name: str) -> tuple[Any, DeploymentSpec]:
    kv = await store.get(keys.deployment(name))
    spec = decode_record(DeploymentSpec, kv.key, kv.value) if kv is not None else None
    if kv is None or spec is None:
        raise APIError(
            404, f"deployment {name} does not exist", param="name", code="deployment_not_found"
        )
    return kv, spec


def _store(request: Request) -> MetaStore:
    store: MetaStore = request.app.state.store
    return store


@router.get("/v1/deployments")
async def list_deployments(request: Request) -> dict[str, Any]:
    store = _store(request)
    result = await store.range(keys.DEPLOYMENTS)
    engines = await _engines(store)
    data = []
    for kv in result.items:
        spec = decode_record(DeploymentSpec, kv.key, kv.value)
        if spec is not None and keys.name_of(kv.key, keys.DEPLOYMENTS):
            data.append(deployment_view(spec, [e for e in engines if e.deployment == spec.name]))
    return {"object": "list", "data": data}


def _principal(request: Request) -> str:
    return str(getattr(request.state, "principal", "anonymous"))


def _admit(request: Request, spec: DeploymentSpec) -> None:
    try:
        policy.check(spec, request.app.state.policy)
    except policy.PolicyError as exc:
        raise APIError(422, str(exc), param=exc.param, code="launch_policy") from None


@router.post("/v1/deployments")
async def create_deployment(request: Request, body: JSONBody) -> JSONResponse:
    store = _store(request)
    spec = parse_spec(body)
    _admit(request, spec)
    who = _principal(request)
    spec = spec.model_copy(update={"created_by": who, "updated_by": who})
    key = keys.deployment(spec.name)
    if await store.create(key, spec.encode()):
        return JSONResponse(deployment_view(spec, []), status_code=201)
    _, existing = await _get_spec(store, spec.name)
    if _desired(existing) != _desired(spec):
        raise APIError(
            409,
            f"deployment {spec.name} exists with another spec: PATCH it "
            "(replicas) or DELETE it first",
            param="name",
            code="deployment_exists",
        )
    engines = await _engines(store, spec.name)
    return JSONResponse(deployment_view(existing, engines), status_code=200)


@router.get("/v1/deployments/{name}")
async def get_deployment(name: str, request: Request) -> dict[str, Any]:
    store = _store(request)
    _, spec = await _get_spec(store, name)
    return deployment_view(spec, await _engines(store, name))


@router.patch("/v1/deployments/{name}")
async def update_deployment(name: str, request: Request, body: JSONBody) -> dict[str, Any]:
    store = _store(request)
    _unknown(
        set(body),
        _PATCHABLE,
        why="cannot be changed in place (patchable: max_restarts, placement, replicas)",
    )
    while True:
        kv, spec = await _get_spec(store, name)
        try:
            updated = DeploymentSpec.model_validate(
                {**spec.model_dump(), **body, "updated_by": _principal(request)}
            )
        except ValidationError as exc:
            raise validation_error(exc, status=422) from None
        if (await store.compare_and_swap(kv, updated.encode())).succeeded:
            break  # else someone wrote it meanwhile: re-read and apply the patch again
    return deployment_view(updated, await _engines(store, name))


@router.delete("/v1/deployments/{name}")
async def delete_deployment(name: str, request: Request) -> dict[str, Any]:
    store = _store(request)
    if not await store.delete(keys.deployment(name)):
        raise APIError(
            404, f"deployment {name} does not exist", param="name", code="deployment_not_found"
        )
    return {"name": name, "deleted": True}


def _desired(spec: DeploymentSpec) -> dict[str, Any]:
    return spec.model_dump(exclude=set(_SERVER_FIELDS))
