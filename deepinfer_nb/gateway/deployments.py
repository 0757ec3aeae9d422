"""The deployments API: create, list, inspect, change and delete `deployments/{name}` records.

The gateway writes only deployment records (the controller turns them into engines and rolls
them when their engine settings change: specs.py, control/rollout.py). POST takes the original
deepinfer body as is (`{"model", "engine", "device", "tensor_parallel_size",
"gpu_memory_utilization"}`) plus our fields (name, replicas, placement, engine_args, ...); an
invalid or unknown field is a 422 naming it, and so is a spec the launch policy refuses
(`engine/policy.py`; code "launch_policy"; the workers enforce the same rules). Records carry
who created and last changed them (`created_by` / `updated_by`: the API key's name).

    POST   /v1/deployments               create (201); the same spec again 200 "unchanged";
                                         other settings 200 "updated"; another model 409
    PUT    /v1/deployments/{name}        create or replace with exactly this spec (apply)
    PATCH  /v1/deployments/{name}        change the given fields
    POST   /v1/deployments/{name}/rollback   back to the engine settings before the last change
    POST   /v1/deployments/{name}/restart    replace every engine, one at a time

Changing answers carry `"change": "created" | "updated" | "unchanged"`. Responses show the
deployment with its engines' states and its `rollout_status`, read from the store (not the
routing table) so a client sees its own write at once, and `idle` (scaled to zero after its
`idle_timeout`: the next request starts an engine). Engine auth tokens and env values are never
returned.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .. import specs
from ..defaults import effective, placed_device
from ..engine import policy
from ..hub import preflight
from ..models import DeploymentSpec, Engine, EngineState, Node
from ..store import MetaStore, decode_record, keys
from ..store.activity import read_all
from .errors import APIError, validation_error
from .routing import unavailable_reason

router = APIRouter(tags=["deployments"])
JSONBody = Annotated[dict[str, Any], Body()]

MASK = policy.REDACTED
"""How env values (secrets) are shown."""
_SERVER_FIELDS = frozenset(
    {
        "created_at",
        "created_by",
        "updated_by",
        "schema_version",
        "previous",
        "restart_generation",
        "facts",
    }
)
_ENGINE_HIDDEN = frozenset({"auth_token", "schema_version"})
IDLE_MESSAGE = "Idle (scaled to zero)"


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


def deployment_view(
    spec: DeploymentSpec, engines: list[Engine], *, any_gpu: bool = False, idle: bool = False
) -> dict[str, Any]:
    """The deployment as clients see it, with `effective`: the engine settings after the device
    defaults (from a launched engine's record once there is one: its node resolved them)."""
    out = spec.model_dump(mode="json", exclude={"schema_version"})
    launched = specs.current_settings(spec, engines)
    settings = launched or effective(spec, placed_device(spec, any_gpu=any_gpu))
    out["effective"] = settings.model_dump(mode="json")
    out["env"] = {k: MASK for k in spec.env}
    if spec.previous is not None and "env" in spec.previous:
        out["previous"]["env"] = {k: MASK for k in spec.previous["env"]}
    out["engine_args"] = policy.redact_args(spec.engine_args)
    out["rollout_status"] = specs.status(spec, engines)
    ready = sum(1 for e in engines if e.state is EngineState.RUNNING)
    out["model_name"] = spec.model_name
    out["ready_replicas"] = ready
    out["idle"] = idle
    if ready:
        out["message"] = ""
    elif idle:
        out["message"] = f"{IDLE_MESSAGE}: the next request starts an engine"
    else:
        out["message"] = unavailable_reason(spec, engines)
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


async def _idle(store: MetaStore, specs: list[DeploymentSpec]) -> set[str]:
    """Which of `specs` are scaled to zero."""
    records = await read_all(store)
    return {s.name for s in specs if s.name in records and records[s.name].idles(s)}


async def _get_spec(store: MetaStore, name: str) -> tuple[Any, DeploymentSpec]:
    kv = await store.get(keys.deployment(name))
    spec = decode_record(DeploymentSpec, kv.key, kv.value) if kv is not None else None
    if kv is None or spec is None:
        raise APIError(
            404, f"deployment {name} does not exist", param="name", code="deployment_not_found"
        )
    return kv, spec


async def _preflight(request: Request, spec: DeploymentSpec) -> DeploymentSpec:
    """The spec with the model's size facts, or a 422 saying why no node can run it."""
    store = _store(request)
    result = await store.range(keys.NODES)
    nodes = [
        n
        for kv in result.items
        if keys.name_of(kv.key, keys.NODES)
        and (n := decode_record(Node, kv.key, kv.value)) is not None
    ]
    hub = preflight.Hub.of(request.app.state.settings.agent)
    checked = await asyncio.to_thread(preflight.run, spec, nodes, hub=hub)
    if checked.problems:
        raise APIError(
            422,
            f"cannot deploy {spec.model}: " + "; and ".join(checked.problems),
            param="model",
            code="model_cannot_run",
        )
    return checked.spec


async def _any_gpu(store: MetaStore) -> bool:
    """Whether some registered node has a GPU (what device "auto" will mean)."""
    result = await store.range(keys.NODES)
    for kv in result.items:
        if keys.name_of(kv.key, keys.NODES):
            node = decode_record(Node, kv.key, kv.value)
            if node is not None and node.gpus:
                return True
    return False


def _store(request: Request) -> MetaStore:
    store: MetaStore = request.app.state.store
    return store


@router.get("/v1/deployments")
async def list_deployments(request: Request) -> dict[str, Any]:
    store = _store(request)
    result = await store.range(keys.DEPLOYMENTS)
    engines = await _engines(store)
    gpu = await _any_gpu(store)
    found = [
        spec
        for kv in result.items
        if keys.name_of(kv.key, keys.DEPLOYMENTS)
        and (spec := decode_record(DeploymentSpec, kv.key, kv.value)) is not None
    ]
    idle = await _idle(store, found)
    data = []
    for spec in found:
        mine = [e for e in engines if e.deployment == spec.name]
        data.append(deployment_view(spec, mine, any_gpu=gpu, idle=spec.name in idle))
    return {"object": "list", "data": data}


@router.post("/v1/deployments")
async def create_deployment(request: Request, body: JSONBody) -> JSONResponse:
    spec = parse_spec(body)
    return await _put(request, spec, keep_model=True)


@router.put("/v1/deployments/{name}")
async def replace_deployment(name: str, request: Request, body: JSONBody) -> JSONResponse:
    if body.get("name", name) != name:
        raise APIError(422, f"name: {body['name']!r} differs from the URL's {name!r}", param="name")
    spec = parse_spec({**body, "name": name})
    return await _put(request, spec, keep_model=False)


def _principal(request: Request) -> str:
    return str(getattr(request.state, "principal", "anonymous"))


def _admit(request: Request, spec: DeploymentSpec) -> None:
    try:
        policy.check(spec, request.app.state.policy)
    except policy.PolicyError as exc:
        raise APIError(422, str(exc), param=exc.param, code="launch_policy") from None


async def _put(request: Request, spec: DeploymentSpec, *, keep_model: bool) -> JSONResponse:
    """Create `spec`, or change the existing deployment to it (rolling its engines)."""
    store = _store(request)
    who = _principal(request)
    spec = spec.model_copy(update={"created_by": who, "updated_by": who})
    spec = await _preflight(request, spec)
    key = keys.deployment(spec.name)
    while True:
        _admit(request, spec)
        if await store.create(key, spec.encode()):
            return await _changed(store, spec, "created", status=201)
        kv, existing = await _get_spec(store, spec.name)
        if keep_model and existing.model != spec.model:
            raise APIError(
                409,
                f"deployment {spec.name} serves {existing.model}, not {spec.model}: pick another "
                "name, PUT/PATCH it to change its model, or DELETE it first",
                param="name",
                code="deployment_exists",
            )
        updated = specs.change(existing, _unmasked(spec, existing))
        if updated is not None:
            _admit(request, updated)
        if updated is None:
            return await _changed(store, existing, "unchanged")
        if (await store.compare_and_swap(kv, updated.encode())).succeeded:
            return await _changed(store, updated, "updated")
        # someone wrote it meanwhile: re-read and compare again


def _unmasked(spec: DeploymentSpec, existing: DeploymentSpec) -> DeploymentSpec:
    """`spec` with each env value "***" (as views and `export` show secrets) meaning: keep the
    deployment's own value, so an exported file applies back unchanged."""
    env = {k: existing.env.get(k, v) if v == MASK else v for k, v in spec.env.items()}
    return spec.model_copy(update={"env": env})


async def _changed(
    store: MetaStore, spec: DeploymentSpec, change: str, *, status: int = 200
) -> JSONResponse:
    engines = await _engines(store, spec.name)
    idle = spec.name in await _idle(store, [spec])
    view = deployment_view(spec, engines, any_gpu=await _any_gpu(store), idle=idle)
    return JSONResponse({**view, "change": change}, status_code=status)


@router.get("/v1/deployments/{name}")
async def get_deployment(name: str, request: Request) -> dict[str, Any]:
    store = _store(request)
    _, spec = await _get_spec(store, name)
    engines = await _engines(store, name)
    idle = name in await _idle(store, [spec])
    return deployment_view(spec, engines, any_gpu=await _any_gpu(store), idle=idle)


@router.patch("/v1/deployments/{name}")
async def update_deployment(name: str, request: Request, body: JSONBody) -> JSONResponse:
    _unknown(
        set(body),
        set(DeploymentSpec.model_fields) - _SERVER_FIELDS - {"name"},
        why="unknown field (or one that cannot be changed)",
    )
    if "engine_args" in body:
        body = {**body, "engine_args": engine_args(body["engine_args"])}
    return await _modify(request, name, lambda spec: _patched(spec, body))


def _patched(spec: DeploymentSpec, body: dict[str, Any]) -> DeploymentSpec | None:
    try:
        wanted = DeploymentSpec.model_validate({**spec.model_dump(), **body})
    except ValidationError as exc:
        raise validation_error(exc, status=422) from None
    return specs.change(spec, wanted)


@router.post("/v1/deployments/{name}/rollback")
async def rollback_deployment(name: str, request: Request) -> JSONResponse:
    def back(spec: DeploymentSpec) -> DeploymentSpec:
        previous = specs.rolled_back(spec)
        if previous is None:
            raise APIError(
                409,
                f"deployment {name} has no earlier engine settings to roll back to",
                param="name",
                code="nothing_to_roll_back",
            )
        return previous

    return await _modify(request, name, back)


@router.post("/v1/deployments/{name}/restart")
async def restart_deployment(name: str, request: Request) -> JSONResponse:
    return await _modify(request, name, specs.restarted)


async def _modify(
    request: Request, name: str, fn: Callable[[DeploymentSpec], DeploymentSpec | None]
) -> JSONResponse:
    """Apply `fn` to the stored spec by compare-and-swap (None from `fn`: nothing to change);
    another model is checked and its facts read as a PUT's are; the launch policy admits the
    result, which records who changed it."""
    store = _store(request)
    while True:
        kv, spec = await _get_spec(store, name)
        updated = fn(spec)
        if updated is None:
            return await _changed(store, spec, "unchanged")
        if not specs.same_model(spec, updated):
            updated = await _preflight(request, updated)
        _admit(request, updated)
        updated = updated.model_copy(update={"updated_by": _principal(request)})
        if (await store.compare_and_swap(kv, updated.encode())).succeeded:
            return await _changed(store, updated, "updated")
        # else someone wrote it meanwhile: re-read and apply again


@router.delete("/v1/deployments/{name}")
async def delete_deployment(name: str, request: Request) -> dict[str, Any]:
    store = _store(request)
    if not await store.delete(keys.deployment(name)):
        raise APIError(
            404, f"deployment {name} does not exist", param="name", code="deployment_not_found"
        )
    await store.delete(keys.activity(name))  # a new deployment of the name starts awake
    return {"name": name, "deleted": True}
