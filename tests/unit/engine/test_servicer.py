"""The shim's servicer (engine/server.py) over the FakeBackend: the real gRPC server, interceptor
and client on loopback, no vLLM. Validation, usage, choices, streaming, cancel, disconnect, auth,
serving states and draining are the servicer's own logic; what vLLM itself must do (answers,
sampling, abort of a real engine request, the process tree) stays in
tests/integration/engine/test_shim.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

from deepinfer_nb._proto import engine_service_pb2 as pb
from deepinfer_nb.errors import (
    AuthenticationError,
    EngineUnavailableError,
    InvalidRequestError,
    UnsupportedTaskError,
)
from deepinfer_nb.testing import FakeBackend, InProcessShim, running_shim

REPLY = "The capital of France is Paris."


def chat(content: str = "What is the capital of France?", **sampling: object) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=content)],
        sampling=pb.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


async def collect(stream: object) -> tuple[dict[int, str], dict[int, str], pb.Usage, int]:
    """Texts and finish reasons per choice, the final usage, and the number of events."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage, events = pb.Usage(), 0
    async for event in stream:  # type: ignore[attr-defined]
        events += 1
        for d in event.deltas:
            texts[d.index] = texts.get(d.index, "") + d.text
            if d.finish_reason:
                reasons[d.index] = d.finish_reason
        if event.finished:
            usage = event.usage
    return texts, reasons, usage, events


@pytest_asyncio.fixture
async def shim() -> AsyncIterator[InProcessShim]:
    async with running_shim(FakeBackend(reply=REPLY), token="test-token", model_name="fake") as s:
        yield s


async def test_unary_answer_and_usage_from_token_ids(shim: InProcessShim) -> None:
    async with shim.client() as client:
        reply = await client.chat(chat(max_tokens=64))
    choice = reply.choices[0]
    assert choice.text == REPLY and choice.finish_reason == "stop"
    # one token per character, then EOS; the prompt is the rendered chat without BOS
    assert reply.usage.completion_tokens == len(choice.token_ids) == len(REPLY) + 1
    rendered = "<|user|>What is the capital of France?\n<|assistant|>"
    assert reply.usage.prompt_tokens == len(rendered)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == "fake"


async def test_stream_deltas_concatenate_to_unary_answer(shim: InProcessShim) -> None:
    req = chat(max_tokens=12, stop=["France"])
    async with shim.client() as client:
        unary = await client.chat(req)
        texts, reasons, usage, events = await collect(client.chat_stream(req))
    assert texts[0] == unary.choices[0].text == "The capital "
    assert reasons[0] == unary.choices[0].finish_reason == "length"
    assert events > 3  # several deltas, not one blob
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        unary.usage.prompt_tokens,
        unary.usage.completion_tokens,
    )


async def test_stop_string_is_held_back_and_named(shim: InProcessShim) -> None:
    async with shim.client() as client:
        stopped = await client.chat(chat(max_tokens=64, stop=["Paris"]))
        texts, _, _, _ = await collect(client.chat_stream(chat(max_tokens=64, stop=["Paris"])))
    choice = stopped.choices[0]
    assert (choice.finish_reason, choice.stop_reason) == ("stop", "Paris")
    assert choice.text == texts[0] == "The capital of France is "


async def test_n_two_returns_two_choices(shim: InProcessShim) -> None:
    async with shim.client() as client:
        reply = await client.chat(chat(n=2, max_tokens=5))
        texts, reasons, usage, _ = await collect(client.chat_stream(chat(n=2, max_tokens=5)))
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.text == "The c" and c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 10 == usage.completion_tokens
    assert texts == {0: "The c", 1: "The c"} and reasons == {0: "length", 1: "length"}


async def test_logprobs_per_token(shim: InProcessShim) -> None:
    async with shim.client() as client:
        reply = await client.chat(chat(max_tokens=4, logprobs=3))
    choice = reply.choices[0]
    assert len(choice.logprobs) == len(choice.token_ids) == 4
    for lp, token_id in zip(choice.logprobs, choice.token_ids, strict=True):
        assert lp.token_id == token_id and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0].token_id == token_id


async def test_sixteen_concurrent_streams_complete(shim: InProcessShim) -> None:
    shim.backend.token_latency_s = 0.005
    async with shim.client() as client:
        results = await asyncio.gather(
            *[
                collect(client.chat_stream(chat(f"take {i}", max_tokens=32, ignore_eos=True)))
                for i in range(16)
            ]
        )
    for texts, reasons, usage, _ in results:
        assert reasons == {0: "length"} and usage.completion_tokens == 32 and texts[0]


BAD_REQUESTS = {
    "empty messages": (pb.ChatRequest(), "at least one message"),
    "unknown role": (
        pb.ChatRequest(messages=[pb.ChatMessage(role="wizard", content="hi")]),
        "role 'wizard'",
    ),
    "temperature < 0": (chat(temperature=-0.5), "temperature"),
    "top_p = 0": (chat(top_p=0.0), "top_p"),
    "top_p > 1": (chat(top_p=1.5), "top_p"),
    "max_tokens < 1": (chat(max_tokens=0), "max_tokens"),
    "max_tokens beyond context": (chat(max_tokens=5000), "context window"),
    "n < 1": (chat(n=0), "n must be"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_input_is_invalid_argument(shim: InProcessShim, case: str) -> None:
    request, phrase = BAD_REQUESTS[case]
    async with shim.client() as client:
        with pytest.raises(InvalidRequestError, match=phrase):
            await client.chat(request)
        with pytest.raises(InvalidRequestError, match=phrase):
            await collect(client.chat_stream(request))
    assert shim.backend.requests == 0  # refused before the engine saw it


async def test_bad_prompt_token_ids_are_invalid(shim: InProcessShim) -> None:
    async with shim.client() as client:
        with pytest.raises(InvalidRequestError, match="beyond the vocabulary"):
            await client.generate(pb.GenerateRequest(prompt_token_ids=[1, 1 << 30]))
        with pytest.raises(InvalidRequestError, match="not both"):
            await client.generate(pb.GenerateRequest(prompt="a", prompt_token_ids=[5]))


async def test_bad_requests_do_not_disturb_a_running_one(shim: InProcessShim) -> None:
    shim.backend.token_latency_s = 0.01
    async with shim.client() as client:
        good = asyncio.create_task(
            collect(client.chat_stream(chat(max_tokens=24, ignore_eos=True)))
        )
        for request, _ in BAD_REQUESTS.values():
            with pytest.raises(InvalidRequestError):
                await client.chat(request)
        texts, reasons, usage, _ = await good
    assert reasons == {0: "length"} and usage.completion_tokens == 24 and texts[0]


async def test_auth_token_enforced(shim: InProcessShim) -> None:
    for token in ("", "wrong-token"):
        async with shim.client(token=token) as client:
            with pytest.raises(AuthenticationError):
                await client.health()
            with pytest.raises(AuthenticationError):
                await client.chat(chat(max_tokens=4))
            with pytest.raises(AuthenticationError):
                await collect(client.chat_stream(chat(max_tokens=4)))
    assert shim.backend.requests == 0


async def test_embeddings_refused_on_a_generative_model(shim: InProcessShim) -> None:
    async with shim.client() as client:
        with pytest.raises(UnsupportedTaskError, match="not embeddings"):
            await client.embed(pb.EmbeddingRequest(input=["hello"]))


async def test_embeddings_from_an_embedding_model() -> None:
    async with (
        running_shim(FakeBackend(task="embed", embedding_dims=4)) as shim,
        shim.client() as client,
    ):
        reply = await client.embed(pb.EmbeddingRequest(input=["hello", "hello", "other"]))
        with pytest.raises(InvalidRequestError, match="at least one string"):
            await client.embed(pb.EmbeddingRequest())
    vectors = [np.frombuffer(e.float32_le, dtype="<f4").tolist() for e in reply.data]
    assert [len(v) for v in vectors] == [4, 4, 4]
    assert vectors[0] == vectors[1] != vectors[2]
    assert reply.usage.prompt_tokens == 2 * 6 + 6  # BOS + characters, per input


async def test_cancel_mid_stream_aborts_the_request(shim: InProcessShim) -> None:
    shim.backend.token_latency_s = 0.01
    async with shim.client() as client:
        req = chat(max_tokens=1500, ignore_eos=True)
        req.request_id = "cancel-me"
        reasons: list[str] = []
        async for event in client.chat_stream(req):
            if any(d.token_ids for d in event.deltas) and not reasons:
                assert (await client.metrics()).inflight_rpcs == 1
                assert await client.cancel("cancel-me") is True
                reasons.append("cancelled")
            reasons += [d.finish_reason for d in event.deltas if d.finish_reason]
        assert reasons[-1] == "abort"
        assert (await client.metrics()).inflight_rpcs == 0
        assert await client.cancel("cancel-me") is False
    assert shim.backend.aborted == ["cancel-me"]


async def test_disconnecting_client_aborts_the_request(shim: InProcessShim) -> None:
    shim.backend.token_latency_s = 0.01
    async with shim.client() as client:
        req = chat(max_tokens=1500, ignore_eos=True)
        req.request_id = "leaves-early"
        stream = client.chat_stream(req)
        async for event in stream:
            if any(d.token_ids for d in event.deltas):
                break
        await stream.aclose()  # type: ignore[attr-defined]
        for _ in range(200):
            if (await client.metrics()).inflight_rpcs == 0:
                break
            await asyncio.sleep(0.01)
    assert shim.backend.aborted == ["leaves-early"]


async def test_failure_mid_stream_ends_the_stream_with_the_error(shim: InProcessShim) -> None:
    shim.backend.error_after_tokens = 3
    async with shim.client() as client:
        with pytest.raises(Exception, match="failed mid-stream") as err:
            await collect(client.chat_stream(chat(max_tokens=10)))
    assert type(err.value).__name__ == "EngineError"


async def test_starting_then_ready_then_draining() -> None:
    backend = FakeBackend(token_latency_s=0.01)
    async with running_shim(backend, ready=False, grace_s=30) as shim, shim.client() as client:
        assert (await client.health()).status == pb.SERVING_STATUS_STARTING
        with pytest.raises(EngineUnavailableError, match="still loading"):
            await client.chat(chat(max_tokens=4))
        shim.servicer.mark_ready()
        assert (await client.health()).status == pb.SERVING_STATUS_READY
        info = await client.model_info()
        assert (info.model, info.task, info.architecture) == ("fake", "generate", "FakeForCausalLM")

        events = client.chat_stream(chat(max_tokens=40, ignore_eos=True)).__aiter__()
        await events.__anext__()
        reply = await client.shutdown(grace_period_s=30)
        assert reply.accepted and reply.inflight == 1
        assert (await client.health()).status == pb.SERVING_STATUS_DRAINING
        with pytest.raises(EngineUnavailableError, match="shutting down"):
            await client.chat(chat(max_tokens=4))
        drained = asyncio.create_task(shim.servicer.drain(30))
        _, reasons, usage, _ = await collect(events)
        await drained
    assert reasons == {0: "length"} and usage.completion_tokens == 40


async def test_drain_aborts_what_outlives_the_grace_period() -> None:
    backend = FakeBackend(token_latency_s=0.02)
    async with running_shim(backend) as shim, shim.client() as client:
        events = client.chat_stream(chat(max_tokens=1500, ignore_eos=True)).__aiter__()
        await events.__anext__()
        shim.servicer.begin_shutdown(0.2)
        await shim.servicer.drain(0.2)
        _, reasons, _, _ = await collect(events)
    assert reasons == {0: "abort"} and len(backend.aborted) == 1
