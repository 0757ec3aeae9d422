"""The engine conformance suite: the shim against each real backend on CPU (issue 2's Must-show
list, run per backend for issue 15): vLLM on the built SmolLM2 folder, llama.cpp on its GGUF.

`engine` here is parametrized over the backends (one shim per backend, shared by the module's
tests; the last test shuts it down). Where the backends differ, the test says what each must do,
from `backends.CAPABILITIES` (a missing feature must answer UNIMPLEMENTED, nothing else). The
servicer's own logic (validation, choices, auth, serving states) is tested over the FakeBackend
in tests/unit/engine/test_servicer.py; here is what needs a real engine.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

import psutil
import pytest
import pytest_asyncio

from deepinfer_nb._proto import engine_service_pb2 as pb
from deepinfer_nb.engine.backends import CAPABILITIES, NAMES
from deepinfer_nb.engine.cpu_dtype import best_cpu_dtype
from deepinfer_nb.engine.stats import ITL_BUCKETS, TTFT_BUCKETS
from deepinfer_nb.errors import (
    EngineUnavailableError,
    UnsupportedFeatureError,
    UnsupportedTaskError,
)
from tests.fixtures.engine import ShimProcess, run_engine

pytestmark = pytest.mark.engine

QUESTION = "What is the capital of France?"
# The 4-bit GGUF answers the bare question at temperature 0 with "L'Étoile, la Cité, ..."
PARIS_QUESTION = {"vllm": QUESTION, "llama.cpp": QUESTION + " Answer in one word."}


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=NAMES)
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[ShimProcess]:
    """This module's shim, once per backend (the conformance suite of issue 15): pytest runs one
    backend's tests, ends that shim, then starts the next; the last test shuts it down."""
    async with run_engine(request.param) as shim:
        yield shim


def chat(content: str = QUESTION, **sampling: object) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=content)],
        sampling=pb.SamplingParams(**sampling),
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


async def wait_idle(client: object, *, timeout: float = 20.0) -> pb.MetricsResponse:
    deadline = time.monotonic() + timeout
    while True:
        m = await client.metrics()  # type: ignore[attr-defined]
        if (
            m.running_requests == 0 and m.waiting_requests == 0 and m.inflight_rpcs == 0
        ) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.2)


async def test_paris_at_temperature_zero(engine: ShimProcess) -> None:
    async with engine.client() as client:
        reply = await client.chat(
            chat(PARIS_QUESTION[engine.backend], temperature=0, max_tokens=40)
        )
    choice = reply.choices[0]
    assert "Paris" in choice.text
    assert choice.finish_reason == "stop"
    assert reply.usage.completion_tokens == len(choice.token_ids) > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == engine.model  # the served name


async def test_stream_deltas_concatenate_to_unary_answer(engine: ShimProcess) -> None:
    req = chat(
        "Write a short poem about the sea.", temperature=0.9, top_p=0.95, seed=1234, max_tokens=48
    )
    async with engine.client() as client:
        unary = await client.chat(req)
        texts, reasons, usage, events = await collect(client.chat_stream(req))
    assert texts[0] == unary.choices[0].text != ""
    assert reasons[0] == unary.choices[0].finish_reason
    assert events > 3  # several deltas, not one blob
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        unary.usage.prompt_tokens,
        unary.usage.completion_tokens,
    )


async def test_stop_string_and_max_tokens_finish_reasons(engine: ShimProcess) -> None:
    async with engine.client() as client:
        question = PARIS_QUESTION[engine.backend]
        stopped = await client.chat(chat(question, temperature=0, max_tokens=40, stop=["Paris"]))
        cut = await client.chat(chat(question, temperature=0, max_tokens=3))
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].stop_reason == "Paris"
    assert "Paris" not in stopped.choices[0].text
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 3


async def test_stop_token_ids(engine: ShimProcess) -> None:
    async with engine.client() as client:
        first = await client.chat(chat(temperature=0, max_tokens=20))
        stop_id = first.choices[0].token_ids[2]
        stopped = await client.chat(chat(temperature=0, max_tokens=20, stop_token_ids=[stop_id]))
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].stop_reason == str(stop_id)
    assert list(stopped.choices[0].token_ids) == list(first.choices[0].token_ids[:3])


async def test_seeded_sampled_request_is_reproducible(engine: ShimProcess) -> None:
    req = chat("Tell me a story about a dragon.", temperature=1.2, seed=42, max_tokens=40)
    async with engine.client() as client:
        a = await client.chat(req)
        b = await client.chat(req)
    assert a.choices[0].text == b.choices[0].text
    assert list(a.choices[0].token_ids) == list(b.choices[0].token_ids)


async def test_sixteen_concurrent_streams_complete(engine: ShimProcess) -> None:
    async with engine.client() as client:
        results = await asyncio.gather(
            *[
                collect(
                    client.chat_stream(
                        chat(
                            f"Count to ten, take {i}.",
                            temperature=0.7,
                            seed=i,
                            max_tokens=32,
                            ignore_eos=True,
                        )
                    )
                )
                for i in range(16)
            ]
        )
    for texts, reasons, usage, _ in results:
        assert reasons == {0: "length"}
        assert usage.completion_tokens == 32
        assert texts[0]


async def test_cancel_mid_stream_frees_the_engine(engine: ShimProcess) -> None:
    async with engine.client() as client:
        stream = client.chat_stream(
            pb.ChatRequest(
                request_id="cancel-me",
                messages=[pb.ChatMessage(role="user", content=QUESTION)],
                sampling=pb.SamplingParams(max_tokens=1500, ignore_eos=True),
            )
        )
        reasons = []
        async for event in stream:
            if any(d.token_ids for d in event.deltas) and not reasons:
                assert (await client.metrics()).running_requests >= 1
                assert await client.cancel("cancel-me") is True
                reasons.append("cancelled")
            reasons += [d.finish_reason for d in event.deltas if d.finish_reason]
        assert reasons[-1] == "abort"
        metrics = await wait_idle(client)
        assert metrics.running_requests == 0 and metrics.inflight_rpcs == 0
        assert await client.cancel("cancel-me") is False


async def test_disconnecting_client_aborts_the_request(engine: ShimProcess) -> None:
    async with engine.client() as client:
        stream = client.chat_stream(chat(max_tokens=1500, ignore_eos=True))
        async for event in stream:
            if any(d.token_ids for d in event.deltas):
                break
        await stream.aclose()  # type: ignore[attr-defined]
        metrics = await wait_idle(client)
    assert metrics.running_requests == 0 and metrics.inflight_rpcs == 0


async def test_min_tokens_honoured_or_unimplemented(engine: ShimProcess) -> None:
    req = chat(PARIS_QUESTION[engine.backend], temperature=0, max_tokens=40, min_tokens=30)
    async with engine.client() as client:
        if CAPABILITIES[engine.backend].min_tokens:  # type: ignore[index]
            reply = await client.chat(req)
            assert reply.usage.completion_tokens >= 30
            return
        # UnsupportedFeatureError is what the client decodes UNIMPLEMENTED to (status.ERRORS)
        with pytest.raises(UnsupportedFeatureError, match="min_tokens is not supported"):
            await client.chat(req)
        with pytest.raises(UnsupportedFeatureError, match="min_tokens is not supported"):
            await collect(client.chat_stream(req))


async def test_json_object_response_format(engine: ShimProcess) -> None:
    req = chat(
        "Give me a JSON object describing a cat with name and age.",
        temperature=0,
        max_tokens=120,
        response_format=pb.RESPONSE_FORMAT_JSON_OBJECT,
    )
    async with engine.client() as client:
        reply = await client.chat(req)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].text), dict)


async def test_logprobs_returned(engine: ShimProcess) -> None:
    async with engine.client() as client:
        reply = await client.chat(chat(temperature=0, max_tokens=8, logprobs=3))
    choice = reply.choices[0]
    assert len(choice.logprobs) == len(choice.token_ids)
    for lp, token_id in zip(choice.logprobs, choice.token_ids, strict=True):
        assert lp.token_id == token_id and lp.logprob <= 0
        assert 1 <= len(lp.top) <= 3
        # greedy: the sampled token is the most likely one
        assert lp.top[0].token_id == token_id


async def test_generate_with_raw_prompt(engine: ShimProcess) -> None:
    async with engine.client() as client:
        reply = await client.generate(
            pb.GenerateRequest(
                prompt="The capital of France is",
                sampling=pb.SamplingParams(temperature=0, max_tokens=5),
            )
        )
        texts, _, usage, _ = await collect(
            client.generate_stream(
                pb.GenerateRequest(
                    prompt="The capital of France is",
                    sampling=pb.SamplingParams(temperature=0, max_tokens=5),
                )
            )
        )
    assert "Paris" in reply.choices[0].text
    assert texts[0] == reply.choices[0].text
    assert usage.completion_tokens == reply.usage.completion_tokens == 5


async def test_embeddings_refused_on_a_generative_model(engine: ShimProcess) -> None:
    # vLLM's own list of supported tasks decides; the shim answers FAILED_PRECONDITION
    async with engine.client() as client:
        with pytest.raises(UnsupportedTaskError, match="embedding"):
            await client.embed(pb.EmbeddingRequest(input=["hello"]))


async def test_model_info_and_kv_cache_come_from_the_engine(engine: ShimProcess) -> None:
    async with engine.client() as client:
        info = await client.model_info()
        kv = await client.kv_cache_status()
        metrics = await client.metrics()
    expected = {  # dtype: vLLM's --dtype auto on this CPU; the GGUF's own quantisation
        "vllm": (best_cpu_dtype(), "LlamaForCausalLM"),
        "llama.cpp": ("q4_1", "llama"),
    }
    assert (info.dtype, info.architecture) == expected[engine.backend]
    assert info.max_model_len == 2048 and info.task == "generate"
    assert info.device == "cpu" and info.vocab_size == 49152
    assert kv.num_gpu_blocks > 0 and kv.capacity_tokens == kv.num_gpu_blocks * kv.block_size
    assert 0.0 <= kv.usage <= 1.0
    assert metrics.generation_tokens_total > 0 and metrics.requests_finished_total > 0
    # latency histograms in vLLM's buckets, filled by either engine (the gateway's vllm:* series)
    ttft, itl = metrics.time_to_first_token_s, metrics.inter_token_latency_s
    assert list(ttft.bounds) == list(TTFT_BUCKETS) and list(itl.bounds) == list(ITL_BUCKETS)
    assert len(ttft.counts) == len(TTFT_BUCKETS) + 1 and sum(ttft.counts) > 0 and ttft.sum > 0
    assert sum(itl.counts) > 0 and itl.sum > 0


def test_start_up_heap_frozen_before_ready(engine: ShimProcess) -> None:
    # torch, transformers, vLLM and the tokenizer: full collections would walk all of it
    # llama.cpp's process imports far less than vLLM's (no torch), but freezes it all the same
    least = {"vllm": 100_000, "llama.cpp": 10_000}[engine.backend]
    log = engine.log_path.read_text(errors="replace")
    found = re.search(r"engine ready: .* \((\d+) start-up objects frozen\)", log)
    assert found and int(found.group(1)) > least, engine.log_tail()


async def test_shutdown_drains_in_flight_stream_and_leaves_no_process(engine: ShimProcess) -> None:
    """Last in this module on purpose: it shuts the module's engine down (no extra start)."""
    shim = engine
    try:
        children = psutil.Process(shim.process.pid).children(recursive=True)
        # vLLM's EngineCore (and its worker); llama.cpp runs inside the shim process
        assert bool(children) == (shim.backend == "vllm")
        async with shim.client() as client:
            stream = client.chat_stream(chat(temperature=0, max_tokens=48, ignore_eos=True))
            events = stream.__aiter__()
            first = await events.__anext__()
            reply = await client.shutdown(grace_period_s=120)
            assert reply.accepted and reply.inflight == 1
            assert (await client.health()).status == pb.SERVING_STATUS_DRAINING
            with pytest.raises(EngineUnavailableError, match="shutting down"):
                await client.chat(chat(max_tokens=4))
            texts, reasons, usage, _ = await collect(events)
        assert reasons == {0: "length"} and usage.completion_tokens == 48
        assert first.request_id and texts[0]
        assert await asyncio.to_thread(shim.process.wait, 90) == 0
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, 30)
        assert not alive, f"left behind: {alive}\n{shim.log_tail()}"
    finally:
        shim.kill()
