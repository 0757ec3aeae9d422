"""Request validation rules of the shim (pure; the real shim is tested in integration)."""

from __future__ import annotations

import pytest

from deepinfer_nb._proto import engine_service_pb2 as pb
from deepinfer_nb.engine.validation import (
    Sampling,
    fit_context,
    messages_from_proto,
    sampling_from_proto,
)
from deepinfer_nb.errors import InvalidRequestError


def test_defaults_follow_vllm() -> None:
    s = sampling_from_proto(pb.SamplingParams())
    assert s == Sampling()
    assert s.max_tokens is None and s.temperature == 1.0 and s.n == 1 and not s.json_object


def test_fields_are_carried_over() -> None:
    s = sampling_from_proto(
        pb.SamplingParams(
            max_tokens=7,
            temperature=0,
            top_p=0.5,
            top_k=3,
            stop=["x"],
            stop_token_ids=[2],
            n=2,
            seed=9,
            response_format=pb.RESPONSE_FORMAT_JSON_OBJECT,
            logprobs=0,
            ignore_eos=True,
        )
    )
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k) == (7, 0.0, 0.5, 3)
    assert (s.stop, s.stop_token_ids, s.n, s.seed) == (("x",), (2,), 2, 9)
    assert s.json_object and s.logprobs == 0 and s.ignore_eos


@pytest.mark.parametrize(
    ("params", "phrase"),
    [
        (pb.SamplingParams(temperature=-1), "temperature must be >= 0"),
        (pb.SamplingParams(top_p=0), r"top_p must be in \(0, 1\]"),
        (pb.SamplingParams(top_p=1.01), "top_p"),
        (pb.SamplingParams(max_tokens=0), "max_tokens must be >= 1"),
        (pb.SamplingParams(n=0), "n must be >= 1"),
        (pb.SamplingParams(top_k=-2), "top_k"),
        (pb.SamplingParams(presence_penalty=3), "presence_penalty"),
        (pb.SamplingParams(stop=[""]), "stop strings"),
        (pb.SamplingParams(max_tokens=2, min_tokens=3), "min_tokens"),
    ],
)
def test_bad_sampling_is_rejected_with_a_clear_message(
    params: pb.SamplingParams, phrase: str
) -> None:
    with pytest.raises(InvalidRequestError, match=phrase):
        sampling_from_proto(params)


def test_messages() -> None:
    with pytest.raises(InvalidRequestError, match="at least one message"):
        messages_from_proto([])
    with pytest.raises(InvalidRequestError, match=r"messages\[1\].role 'robot'"):
        messages_from_proto(
            [pb.ChatMessage(role="user", content="a"), pb.ChatMessage(role="robot", content="b")]
        )
    assert messages_from_proto([pb.ChatMessage(role="system", content="s", name="n")]) == [
        {"role": "system", "content": "s", "name": "n"}
    ]


def test_context_window() -> None:
    assert fit_context(Sampling(), prompt_tokens=10, max_model_len=100).max_tokens == 90
    assert (
        fit_context(Sampling(max_tokens=90), prompt_tokens=10, max_model_len=100).max_tokens == 90
    )
    with pytest.raises(InvalidRequestError, match="exceeds the context window of 100"):
        fit_context(Sampling(max_tokens=91), prompt_tokens=10, max_model_len=100)
    with pytest.raises(InvalidRequestError, match="context window is 100"):
        fit_context(Sampling(), prompt_tokens=100, max_model_len=100)
    with pytest.raises(InvalidRequestError, match="empty"):
        fit_context(Sampling(), prompt_tokens=0, max_model_len=100)
