"""The gateway app over a memory store and a fake engine fleet, on a real uvicorn on loopback:
OpenAI wire format, error statuses, retry on another replica, deployments API, security."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import openai
import pytest
import pytest_asyncio

from deepinfer_nb.config import Settings
from deepinfer_nb.errors import ConfigError
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.gateway.protocol import ChatCompletionChunk, CompletionResponse
from deepinfer_nb.models import EngineState
from deepinfer_nb.store import keys
from deepinfer_nb.store.memory import MemoryStore

from .fakes import Behaviour, FakeFleet, put_deployment, put_engine

KEY = "sk-test-key"


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[tuple[MemoryStore, FakeFleet]]:
    store, fleet = MemoryStore(), FakeFleet()
    await put_deployment(store, "smol", served_model_name="smollm2")
    await put_engine(store, "smol", 0)
    await put_engine(store, "smol", 1)
    await put_deployment(store, "qwen", model="Qwen/Qwen2.5-7B-Instruct")
    await put_engine(store, "qwen", 0, state=EngineState.STARTING)
    yield store, fleet
    await store.close()


@pytest_asyncio.fixture
async def gw(cluster: tuple[MemoryStore, FakeFleet]) -> AsyncIterator[GatewayServer]:
    store, fleet = cluster
    settings = Settings()
    settings.server.max_body_bytes = 64 * 1024
    settings.server.hold_timeout_s = 0.3  # "qwen" stays Starting: its requests wait this long
    app = build_app(store, settings=settings, api_keys=[KEY], client_factory=fleet.factory)
    async with GatewayServer(app, host="127.0.0.1", port=0) as server:
        yield server


def _oai(gw: GatewayServer, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def _http(gw: GatewayServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {KEY}"})


async def test_chat_non_streaming_with_usage_and_logprobs(gw: GatewayServer, cluster: Any) -> None:
    _, fleet = cluster
    async with _oai(gw) as client:
        resp = await client.chat.completions.create(
            model="smollm2",
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
            ],
            n=2,
            temperature=0.2,
            top_p=0.9,
            seed=7,
            stop=["\n"],
            max_completion_tokens=32,
            presence_penalty=0.5,
            frequency_penalty=0.1,
            logprobs=True,
            top_logprobs=2,
            response_format={"type": "json_object"},
        )
    assert [c.message.content for c in resp.choices] == ["The capital of France is Paris."] * 2
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 14
    assert resp.choices[0].logprobs.content[0].token == "The"  # type: ignore[union-attr]
    sent = fleet.requests[-1]
    assert sent.messages[0].role == "system"
    s = sent.sampling
    assert (s.n, s.seed, list(s.stop), s.max_tokens, s.logprobs) == (2, 7, ["\n"], 32, 2)
    assert s.response_format == 1 and abs(s.presence_penalty - 0.5) < 1e-6


async def test_chat_stream_chunks_in_openai_order(gw: GatewayServer) -> None:
    async with (
        _http(gw) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "smollm2",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(x[6:]) for x in lines[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    assert len({c.id for c in chunks}) == 1


async def test_completions_stream_and_batch(gw: GatewayServer) -> None:
    async with _oai(gw) as client:
        stream = await client.completions.create(
            model="smollm2", prompt="The capital", max_tokens=3, stream=True
        )
        pieces = [c.choices[0] async for c in stream if c.choices]
        batch = await client.completions.create(model="smol", prompt=["a", "b"], n=2, logprobs=1)
    assert "".join(p.text for p in pieces) == "The capital of"
    assert pieces[-1].finish_reason == "length"
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.usage is not None and batch.usage.prompt_tokens == 14
    lp = batch.choices[0].logprobs
    assert lp is not None and lp.text_offset[:3] == [0, 3, 11]
    CompletionResponse.model_validate(batch.model_dump())


async def _embedding_deployment(store: MemoryStore) -> None:
    await put_deployment(store, "minilm", model="all-minilm-l6-v2")
    await put_engine(store, "minilm", 0, endpoint="10.0.1.1:5000")
    await asyncio.sleep(0.2)  # the gateway's routing table follows the store


async def test_embeddings_float_and_base64(gw: GatewayServer, cluster: Any) -> None:
    await _embedding_deployment(cluster[0])
    async with _oai(gw) as client:
        out = await client.embeddings.create(
            model="minilm", input=["ab", "c"], encoding_format="float"
        )
        b64 = await client.embeddings.create(model="minilm", input="abc")  # base64 by default
    assert out.data[0].embedding == [0.5, -1.0, 2.0]
    assert b64.data[0].embedding == [0.5, -1.0, 3.0]


async def test_wrong_task_is_a_400_that_reaches_no_engine(gw: GatewayServer, cluster: Any) -> None:
    store, fleet = cluster
    await _embedding_deployment(store)
    async with _oai(gw) as client:
        with pytest.raises(openai.BadRequestError) as embed:
            await client.embeddings.create(model="smollm2", input="abc")
        with pytest.raises(openai.BadRequestError) as chat:
            await client.chat.completions.create(
                model="minilm", messages=[{"role": "user", "content": "hi"}]
            )
    assert embed.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert "'smol'" in embed.value.message and "serves text generation" in embed.value.message
    assert "'minilm'" in chat.value.message and "serves embeddings" in chat.value.message
    assert sum(fleet.calls.values()) == 0


@pytest.mark.parametrize(
    "behaviour",
    [
        Behaviour(mode="invalid"),
        Behaviour(mode="status", status=grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_client_caused_engine_errors_are_400_and_not_retried(
    gw: GatewayServer, cluster: Any, behaviour: Behaviour
) -> None:
    """INVALID_ARGUMENT and FAILED_PRECONDITION from an engine: a 400 invalid_request_error,
    from the one replica asked; the other replica (which would answer) is never tried."""
    _, fleet = cluster
    fleet.behaviour["10.0.0.1:5000"] = behaviour
    fleet.behaviour["10.0.0.2:5000"] = behaviour
    async with _oai(gw) as client:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": "hi"}], stream=stream
                )
            assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert sum(fleet.calls.values()) == 2  # one engine call per request


async def test_models_list_only_serving_deployments(gw: GatewayServer, cluster: Any) -> None:
    await _embedding_deployment(cluster[0])
    async with _oai(gw) as client:
        models = await client.models.list()
        assert {m.id: m.task for m in models.data} == {"minilm": "embed", "smollm2": "generate"}
        assert (await client.models.retrieve("smollm2")).id == "smollm2"


async def test_error_statuses(gw: GatewayServer, cluster: Any) -> None:
    _, fleet = cluster
    msgs = [{"role": "user", "content": "hi"}]
    async with _oai(gw) as client:
        with pytest.raises(openai.NotFoundError) as nf:
            await client.chat.completions.create(model="nope", messages=msgs)  # type: ignore
        assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
        with pytest.raises(openai.InternalServerError) as unavailable:
            await client.chat.completions.create(model="qwen", messages=msgs)  # type: ignore
        assert unavailable.value.status_code == 503
        assert "deployment qwen is not ready after 0." in str(unavailable.value)
        assert "qwen is Starting" in str(unavailable.value)
        assert unavailable.value.response.headers["Retry-After"] == "1"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="smollm2",
                messages=msgs,  # type: ignore
                temperature=5,
            )
        assert bad.value.body["param"] == "temperature"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError, match="top_logprobs requires logprobs"):
            await client.chat.completions.create(
                model="smollm2",
                messages=msgs,  # type: ignore
                top_logprobs=2,
            )
        with pytest.raises(openai.BadRequestError, match="not in tools"):
            await client.chat.completions.create(
                model="smollm2",
                messages=msgs,  # type: ignore
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function", "function": {"name": "g"}},
            )
        fleet.behaviour["10.0.0.1:5000"] = Behaviour(mode="invalid")
        fleet.behaviour["10.0.0.2:5000"] = Behaviour(mode="invalid")
        with pytest.raises(openai.BadRequestError, match="context window"):
            await client.chat.completions.create(model="smollm2", messages=msgs)  # type: ignore
        fleet.behaviour["10.0.0.1:5000"] = Behaviour(mode="unavailable")
        fleet.behaviour["10.0.0.2:5000"] = Behaviour(mode="unavailable")
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="smollm2", messages=msgs)  # type: ignore
        assert failed.value.status_code == 502
    async with _http(gw) as http:
        r = await http.post("/v1/chat/completions", content=b"{")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await http.get("/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()


async def test_fails_over_before_first_byte(gw: GatewayServer, cluster: Any) -> None:
    _, fleet = cluster
    fleet.behaviour["10.0.0.1:5000"] = Behaviour(mode="unavailable")
    async with _oai(gw) as client:
        for stream in (False, True, False, True):
            resp = await client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "hi"}], stream=stream
            )
            if stream:
                resp = [c async for c in resp]  # type: ignore[misc]
    assert fleet.calls["10.0.0.2:5000"] == 4  # every request ended on the healthy replica
    assert 1 <= fleet.calls["10.0.0.1:5000"] <= 4


async def test_engine_failure_mid_stream_is_an_error_event(gw: GatewayServer, cluster: Any) -> None:
    _, fleet = cluster
    for ep in ("10.0.0.1:5000", "10.0.0.2:5000"):
        fleet.behaviour[ep] = Behaviour(mode="fail_mid")
    async with _oai(gw) as client:
        stream = await client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match="engine core died"):
            async for _ in stream:
                pass


async def test_client_disconnect_cancels_engine_request(gw: GatewayServer, cluster: Any) -> None:
    _, fleet = cluster
    for ep in ("10.0.0.1:5000", "10.0.0.2:5000"):
        fleet.behaviour[ep] = Behaviour(mode="hang")
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
    async with _http(gw) as http:
        async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    break  # got the first chunk; now hang up
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/chat/completions", json=body, timeout=0.3)
    for _ in range(200):
        if len(fleet.cancelled) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(fleet.cancelled) == 2
    table = gw.app.state.table
    assert all(r.inflight == 0 for r in table._replicas["smol"].values())


async def test_api_key_and_body_cap(gw: GatewayServer) -> None:
    async with _oai(gw, key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    async with httpx.AsyncClient(base_url=gw.url) as anon:
        r = await anon.get("/v1/models")
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        assert (await anon.get("/health")).json()["status"] == "healthy"
    async with _http(gw) as http:
        big = {"model": "smollm2", "messages": [{"role": "user", "content": "x" * 70_000}]}
        r = await http.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 10_000

        r = await http.post("/v1/chat/completions", content=chunked())
        assert r.status_code == 413


async def test_deployments_api(gw: GatewayServer, cluster: Any) -> None:
    store, _ = cluster
    original = {
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "engine": "vllm",
        "device": "cuda:0",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
    }
    async with _http(gw) as http:
        r = await http.post("/v1/deployments", json=original)
        assert r.status_code == 201, r.text
        d = r.json()
        assert d["name"] == "qwen2.5-0.5b-instruct" and d["device"] == "cuda:0"
        assert d["engines"] == [] and "Pending" in d["message"]
        assert (await http.post("/v1/deployments", json=original)).status_code == 200
        r = await http.post("/v1/deployments", json={**original, "replicas": 3})
        assert r.status_code == 200 and r.json()["change"] == "updated"
        r = await http.post(
            "/v1/deployments", json={**original, "model": "other", "name": d["name"]}
        )
        assert r.status_code == 409 and "serves Qwen/Qwen2.5-0.5B-Instruct" in r.text
        for body, field in (
            ({**original, "replicas": -1}, "replicas"),
            ({**original, "device": "tpu"}, "device"),
            ({**original, "bogus": 1}, "bogus"),
            ({"engine": "vllm"}, "model"),
        ):
            r = await http.post("/v1/deployments", json=body)
            assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text
        r = await http.post(
            "/v1/deployments",
            json={
                "model": "m",
                "name": "x2",
                "engine_args": {"max_num_seqs": 8, "enable_prefix_caching": True},
                "placement": {"strategy": "binpack"},
                "env": {"VLLM_CPU_KVCACHE_SPACE": "2"},
                "secrets": ["HF_TOKEN"],
            },
        )
        assert r.json()["engine_args"] == ["--max-num-seqs", "8", "--enable-prefix-caching"]
        assert r.json()["env"] == {"VLLM_CPU_KVCACHE_SPACE": "***"}
        assert r.json()["secrets"] == ["HF_TOKEN"]
        assert r.json()["created_by"] == r.json()["updated_by"] == "api-key"

        r = await http.patch("/v1/deployments/smol", json={"replicas": 3})
        assert r.status_code == 200 and r.json()["replicas"] == 3
        assert r.json()["ready_replicas"] == 2
        assert all("auth_token" not in e for e in r.json()["engines"])
        assert (await http.patch("/v1/deployments/smol", json={"name": "x"})).status_code == 422
        assert (await http.patch("/v1/deployments/nope", json={"replicas": 1})).status_code == 404
        names = [d["name"] for d in (await http.get("/v1/deployments")).json()["data"]]
        assert names == ["qwen", "qwen2.5-0.5b-instruct", "smol", "x2"]
        assert (await http.delete("/v1/deployments/x2")).json() == {"name": "x2", "deleted": True}
        assert (await http.get("/v1/deployments/x2")).status_code == 404
        assert await store.get(keys.deployment("x2")) is None

        engines = (await http.get("/v1/engines")).json()["data"]
        assert len(engines) == 3 and all("auth_token" not in e for e in engines)
        assert (await http.get("/v1/nodes")).json() == {"object": "list", "data": []}
        assert (await http.get("/v1/gpus")).json() == {"object": "list", "data": []}


async def test_metrics_and_health(gw: GatewayServer) -> None:
    async with _oai(gw) as client:
        for _ in range(3):
            await client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="qwen", messages=[{"role": "user", "content": "hi"}]
            )
    async with _http(gw) as http:
        text = (await http.get("/metrics")).text
        health = (await http.get("/health")).json()
    assert (
        'deepinfer_gateway_requests_total{endpoint="chat",model="smollm2",status="200"} 3.0' in text
    )
    assert 'deepinfer_gateway_completion_tokens_total{model="smollm2"} 21.0' in text
    assert 'model="qwen",status="503"} 1.0' in text
    assert 'deepinfer_gateway_engines{state="Running"} 2.0' in text
    assert health["status"] == "healthy" and health["store"]["connected"] is True
    assert health["models"] == ["smollm2"] and health["engines_running"] == 2


async def test_binding_beyond_loopback_needs_a_key() -> None:
    store = MemoryStore()
    app = build_app(store)
    with pytest.raises(ConfigError, match="--api-key-env"):
        GatewayServer(app, host="0.0.0.0", port=0)
    GatewayServer(build_app(store, api_keys=["k"]), host="0.0.0.0", port=0)  # allowed
    await store.close()


def test_sse_chunks_are_json() -> None:
    from deepinfer_nb.gateway.translate import sse

    assert json.loads(sse({"a": "é"})[6:]) == {"a": "é"}


async def test_caller_bound_socket_gets_tcp_nodelay_connections() -> None:
    # The notebook runtime binds the socket itself, with the default proto 0; asyncio then leaves
    # Nagle on for accepted connections and each response waited ~40 ms for the client's delayed
    # ACK (measured: 44 ms vs 2 ms per request). The server must hand asyncio a TCP socket.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    assert sock.proto == 0
    store = MemoryStore()
    async with GatewayServer(build_app(store), sock=sock) as server:
        listening = server._sock
        assert listening is not None and listening.proto == socket.IPPROTO_TCP
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/v1/models")).status_code == 200
    await store.close()
