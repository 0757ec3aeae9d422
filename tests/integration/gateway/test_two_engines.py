"""One cluster, two engines side by side (issue 15): a vLLM deployment and a llama.cpp deployment
of SmolLM2 (the built folder and the GGUF as shipped), both answering through one gateway with
the official `openai` client, each served by the engine its spec resolves to."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from deepinfer_nb.config import Settings
from deepinfer_nb.control.controller import Controller
from deepinfer_nb.control.worker import Worker
from deepinfer_nb.engine import local_models
from deepinfer_nb.engine.client import EngineClient
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.models import DeploymentSpec
from deepinfer_nb.store import keys
from deepinfer_nb.store.memory import MemoryStore

from .conftest import API_KEY, MODEL, GatewayCluster, _wait_running

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

SPECS = [
    DeploymentSpec(
        name="smol-vllm",
        model=MODEL,
        device="cpu",
        enforce_eager=True,
        max_model_len=2048,
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    ),
    # engine left at auto: the GGUF alias makes it llama.cpp
    DeploymentSpec(name="smol-gguf", model=MODEL + "-gguf", max_model_len=2048),
]
QUESTION = "What is the capital of France? Answer in one word."


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def two_engines() -> AsyncIterator[GatewayCluster]:
    local_models.build(local_models.CATALOG[MODEL])  # idempotent
    settings = Settings()
    settings.scheduler.reconcile_interval_s = 0.5
    store = MemoryStore()
    controller = Controller(store, settings=settings.scheduler)
    running = asyncio.create_task(controller.run())
    worker = Worker(
        store,
        node_id="two-engines",
        settings=settings,
        home=Path(tempfile.mkdtemp(prefix="deepinfer-2e-")),
    )
    await worker.start()
    for spec in SPECS:
        await store.put(keys.deployment(spec.name), spec.encode())
    server = GatewayServer(
        build_app(store, settings=settings, api_keys=[API_KEY]), host="127.0.0.1", port=0
    )
    await server.start()
    try:
        await _wait_running(store, worker, len(SPECS))
        yield GatewayCluster(store, server, worker, settings)
    finally:
        await server.stop()
        await worker.stop()
        await controller.stop()
        await asyncio.gather(running, return_exceptions=True)
        await store.close()


async def test_both_engines_answer_through_the_gateway(two_engines: GatewayCluster) -> None:
    async with two_engines.client() as client:
        models = {m.id async for m in client.models.list()}
        replies = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model=spec.name,
                    messages=[{"role": "user", "content": QUESTION}],
                    temperature=0,
                    max_tokens=16,
                )
                for spec in SPECS
            ]
        )
        stream = await client.chat.completions.create(
            model="smol-gguf",
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=16,
            stream=True,
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert models >= {"smol-vllm", "smol-gguf"}
    for reply in replies:
        assert "Paris" in (reply.choices[0].message.content or "")
        assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert streamed == replies[1].choices[0].message.content


async def test_each_deployment_runs_the_engine_its_spec_names(two_engines: GatewayCluster) -> None:
    by_deployment = {e.deployment: e for e in await two_engines.engines()}
    versions = {}
    for name, engine in by_deployment.items():
        async with EngineClient(engine.endpoint, token=engine.auth_token) as client:
            info = await client.model_info()
        versions[name] = (info.engine_version, info.model_path)
    assert not versions["smol-vllm"][0].startswith("llama-cpp-python")
    assert versions["smol-gguf"][0].startswith("llama-cpp-python")
    assert versions["smol-gguf"][1].endswith(".gguf")  # the shipped file, no conversion


async def test_json_schema_and_forced_tool_calls_on_both_engines(
    two_engines: GatewayCluster,
) -> None:
    """response_format json_schema (vLLM's structured outputs, llama.cpp's grammar) and
    tool_choice required, the same OpenAI shapes from both deployments."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    ask = [{"role": "user", "content": "Name a city in France and its country, as JSON."}]
    async with two_engines.client() as client:
        answers = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model=spec.name,
                    messages=ask,  # type: ignore[arg-type]
                    temperature=0,
                    max_tokens=60,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "city", "schema": schema, "strict": True},
                    },
                )
                for spec in SPECS
            ]
        )
        calls = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model=spec.name,
                    messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                    tools=[tool],  # type: ignore[list-item]
                    tool_choice="required",
                    temperature=0,
                    max_tokens=60,
                )
                for spec in SPECS
            ]
        )
    for answer in answers:
        assert set(json.loads(answer.choices[0].message.content or "")) == {"city", "country"}
    for reply in calls:
        assert reply.choices[0].finish_reason == "tool_calls"
        (call, *_) = reply.choices[0].message.tool_calls or []
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert isinstance(json.loads(call.function.arguments)["city"], str)  # type: ignore[union-attr]


async def test_unsupported_feature_is_a_400_naming_the_engine(two_engines: GatewayCluster) -> None:
    async with two_engines.client() as client:
        with pytest.raises(openai.BadRequestError, match="min_tokens"):
            await client.chat.completions.create(
                model="smol-gguf",
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=8,
                extra_body={"min_tokens": 4},
            )
