"""Inputs the property-based API tests (test_api_fuzz.py) found breaking the gateway, kept as
plain tests: each was a 500 (or an answer its schema did not document) before its fix."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.store.memory import MemoryStore

from .fakes import FakeFleet, put_deployment, put_engine


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    store, fleet = MemoryStore(), FakeFleet()
    await put_deployment(store, "smol")
    await put_engine(store, "smol", 0)
    async with (
        GatewayServer(
            build_app(store, client_factory=fleet.factory), host="127.0.0.1", port=0
        ) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        yield client
    await store.close()


# Numbers wider than the engine's fixed-width gRPC fields: protobuf raised ValueError -> 500.
WIDE = [
    ("/v1/completions", {"prompt": [-532, -188363]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2**32]]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**63}, "seed"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2**32}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 2**32}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**31}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/embeddings", {"input": [-1, 5]}, "input"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2**32},
        "max_completion_tokens",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), WIDE, ids=[w[2] for w in WIDE])
async def test_numbers_wider_than_the_engine_fields_are_400(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    r = await http.post(path, json={"model": "smol", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param)


async def test_a_body_that_is_not_json_is_a_documented_400(http: httpx.AsyncClient) -> None:
    for method, path in (("POST", "/v1/deployments"), ("PATCH", "/v1/deployments/smol")):
        r = await http.request(
            method, path, content=b"h'eu\xff", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        documented = (await http.get("/openapi.json")).json()["paths"]
        op = documented[path.replace("smol", "{name}")][method.lower()]
        assert "400" in op["responses"]


async def test_stream_events_are_documented_as_chunks(http: httpx.AsyncClient) -> None:
    """The SSE answer was documented as a bare string, so no event could match it."""
    paths = (await http.get("/openapi.json")).json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        sse = paths[path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        data = sse["properties"]["data"]["anyOf"]
        assert {"const": "[DONE]"} in data
        assert data[1]["contentMediaType"] == "application/json"


async def test_a_model_path_of_an_unknown_users_home_is_not_a_500(http: httpx.AsyncClient) -> None:
    """Found by the fuzz test: pathlib's expanduser raises for "~name" of no such user."""
    r = await http.post("/v1/deployments", json={"model": "~no-such-user-here/model"})
    assert r.status_code < 500, r.text


@pytest.mark.parametrize("value", [[], {}, ["15m"]])
async def test_an_idle_timeout_of_another_json_type_is_a_422(
    http: httpx.AsyncClient, value: Any
) -> None:
    """Found by the fuzz test: parse_duration called .lower() on a list -> 500."""
    r = await http.post("/v1/deployments", json={"model": "m", "idle_timeout": value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "idle_timeout" and "not a duration" in r.text
