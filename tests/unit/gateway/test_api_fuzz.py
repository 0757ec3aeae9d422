"""Property-based tests of the gateway's HTTP API with schemathesis, from its own OpenAPI schema.

Every operation of /openapi.json (OpenAI routes, deployments, engines, nodes, GPUs, health,
metrics) gets FUZZ_EXAMPLES generated requests against a real uvicorn on 127.0.0.1, over the
memory store and a fake fleet: a node with two fake GPUs serving a chat deployment and an
embedding deployment with the real shim over the FakeBackend (deepinfer_nb.testing). Each response
must be no server fault, have a documented status and content type, and match its schema.

The only 5xx a generated input may meet is the documented 503 of a deployment that has no running
replica (fuzzed POSTs create deployments nobody schedules here: there is no controller).
Inputs that broke something are regular tests in test_api_regressions.py.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from deepinfer_nb.config import Settings
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState
from deepinfer_nb.store import keys
from deepinfer_nb.store.memory import MemoryStore
from deepinfer_nb.testing import FakeBackend, FakeNode

T = TypeVar("T")
FUZZ_EXAMPLES = int(os.environ.get("DEEPINFER_FUZZ_EXAMPLES", "200"))
"""Generated requests per operation (at least a few hundred in CI)."""
MODELS = {"fuzz-chat": "generate", "fuzz-embed": "embed"}
SPARE = "fuzz-spare"
"""A deployment without engines, for the fuzzed PATCH and DELETE to hit besides unknown names."""


class Background:
    """The store, the fake fleet and the gateway on an event loop of their own thread (the
    schemathesis calls are synchronous)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _backend(engine: Engine) -> FakeBackend:
    # a short context keeps the biggest generated request (n=128, max_tokens up to it) quick
    return FakeBackend(task=MODELS[engine.deployment], max_model_len=256)


async def _start() -> tuple[MemoryStore, FakeNode, GatewayServer]:
    store = MemoryStore()
    node = await FakeNode(store, "fuzz-node", gpus=2, backend=_backend).start()
    for name in MODELS:
        spec = DeploymentSpec(name=name, model=f"fake/{name}", device="cuda")
        await store.put(keys.deployment(name), spec.encode())
        engine = Engine(
            id=f"{name}-0", deployment=name, state=EngineState.SCHEDULED, node=node.id, gpus=[0]
        )
        await store.put(keys.engine(engine.id), engine.encode())
    await store.put(keys.deployment(SPARE), DeploymentSpec(name=SPARE, model="fake").encode())
    # no controller runs here: nothing would ever start the engines of a fuzzed deployment, so
    # requests for one fail at once instead of waiting for a replica (hold.py)
    settings = Settings()
    settings.server.hold_timeout_s = 0
    server = GatewayServer(build_app(store, settings=settings), host="127.0.0.1", port=0)
    await server.start()
    return store, node, server


async def _stop(store: MemoryStore, node: FakeNode, server: GatewayServer) -> None:
    await server.stop()
    await node.stop()
    await store.close()


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    bg = Background()
    store, node, server = bg.run(_start())
    try:
        deadline = time.monotonic() + 30
        while {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]} != set(MODELS):
            assert time.monotonic() < deadline, "the fake fleet did not serve the deployments"
            time.sleep(0.05)
        yield server.url
    finally:
        bg.run(_stop(store, node, server))
        bg.close()


# The schema as the app builds it (the same document the server serves at /openapi.json), read
# at collection time to make one test per operation.
SCHEMA = schemathesis.openapi.from_dict(build_app(MemoryStore()).openapi())
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}
# Positive cases follow the schema; negative ones break it (only a body can be broken: any
# string is a valid path or query value here).
CASES = [(label, "positive") for label in OPERATIONS] + [
    (label, "negative") for label, op in OPERATIONS.items() if op.body
]


def no_server_fault(ctx: Any, response: Any, case: Any) -> bool | None:
    """`not_a_server_error`, except the documented 503 of a deployment without a replica."""
    if response.status_code == 503 and "no_running_replica" in response.text:
        return None
    return not_a_server_error(ctx, response, case)


def _known_names(cases: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Half the cases name a deployment that exists (a random name is almost always unknown,
    which would leave the serving and update paths untried)."""

    def name(case: Any, known: str | None) -> Any:
        if known is None:
            return case
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = known
        if case.path_parameters and "name" in case.path_parameters:
            case.path_parameters["name"] = SPARE
        if case.path_parameters and "model" in case.path_parameters:
            case.path_parameters["model"] = known
        return case

    return st.builds(name, cases, st.sampled_from([None, *MODELS, SPARE]))


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_api_conforms_to_its_schema(gateway_url: str, label: str, mode: str) -> None:
    op = OPERATIONS[label]
    generation = GenerationMode(mode)
    examples = FUZZ_EXAMPLES if generation is GenerationMode.POSITIVE else FUZZ_EXAMPLES // 2
    statuses: list[int] = []

    @given(case=_known_names(op.as_strategy(generation_mode=generation)))
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(
            base_url=gateway_url,
            timeout=30,
            checks=[
                no_server_fault,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ],
        )
        statuses.append(response.status_code)

    run()
    # an operation without input has one request to make: hypothesis stops there
    takes_input = op.body or list(op.iter_parameters())
    assert len(statuses) >= (min(examples, 50) if takes_input else 1)


def test_the_fuzzed_schema_covers_the_api(gateway_url: str) -> None:
    served = httpx.get(gateway_url + "/openapi.json").json()
    assert served == SCHEMA.raw_schema
    for expected in (
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/embeddings",
        "GET /v1/models",
        "POST /v1/deployments",
        "PATCH /v1/deployments/{name}",
        "DELETE /v1/deployments/{name}",
        "GET /v1/gpus",
    ):
        assert expected in OPERATIONS
