"""Tool requests in the shim: validation, the schema that forces a call, and reading calls back
from generated text (whole, and streamed in deltas that reassemble to the same calls)."""

from __future__ import annotations

import json

import pytest

from deepinfer_nb._proto import engine_service_pb2 as pb
from deepinfer_nb.engine import tool_calls
from deepinfer_nb.engine.tool_calls import ToolCallReader, ToolRequest
from deepinfer_nb.engine.validation import sampling_from_proto
from deepinfer_nb.errors import InvalidRequestError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def _request(choice: str = "", name: str = "", tools: object = (WEATHER, CLOCK)) -> pb.ChatRequest:
    return pb.ChatRequest(
        tools_json=json.dumps(list(tools)),  # type: ignore[call-overload]
        tool_choice=choice,
        tool_choice_name=name,
        parallel_tool_calls=True,
    )


def test_choices_and_their_schemas() -> None:
    auto = tool_calls.tool_request_from_proto(_request())
    assert auto is not None and auto.choice == "auto" and auto.schema() is None
    named = tool_calls.tool_request_from_proto(_request("function", "get_time"))
    assert named is not None and named.schema() == {"type": "object", "properties": {}}
    required = tool_calls.tool_request_from_proto(_request("required"))
    assert required is not None
    schema = required.schema()
    assert schema is not None and schema["type"] == "array" and schema["minItems"] == 1
    names = [a["properties"]["name"]["enum"] for a in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert tool_calls.tool_request_from_proto(pb.ChatRequest()) is None


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (_request("function", "nope"), "not in tools"),
        (_request("sometimes"), "not one of"),
        (pb.ChatRequest(tool_choice="required"), "needs tools"),
        (pb.ChatRequest(tools_json="{", tool_choice="auto"), "not valid JSON"),
        (_request(tools=[{"type": "function", "function": {}}]), "name must be"),
        (_request(tools=[{"type": "retrieval"}]), "must be {'type': 'function'"),
    ],
)
def test_bad_tool_requests_name_the_fault(request_: pb.ChatRequest, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        tool_calls.tool_request_from_proto(request_)


def _stream(reader: ToolCallReader, text: str, step: int = 3) -> tuple[str, list[pb.ToolCall]]:
    content, deltas = "", []
    for i in range(0, len(text), step):
        c, calls = reader.feed(text[i : i + step], [])
        content += c
        deltas += calls
    return content, deltas


def _merge(deltas: list[pb.ToolCall]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
        call["id"] += d.id
        call["name"] += d.name
        call["arguments"] += d.arguments
    return calls


@pytest.mark.parametrize("whole_calls", [False, True], ids=["vllm-helper", "whole-calls"])
def test_required_calls_whole_and_streamed_agree(whole_calls: bool) -> None:
    """Streamed by vLLM's helper (argument deltas) or whole per array element (llama.cpp, which
    has no vLLM to import), the deltas reassemble to the calls the unary answer has."""
    tr = ToolRequest(tools=[WEATHER, CLOCK], choice="required")
    text = json.dumps(
        [
            {"name": "get_weather", "parameters": {"city": "Paris"}},
            {"name": "get_time", "parameters": {}},
        ]
    )
    content, calls = ToolCallReader(tr).final(text)
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"} and calls[0].id
    reader = ToolCallReader(tr, whole_calls=whole_calls)
    content, deltas = _stream(reader, text)
    merged = _merge(deltas)
    assert content == "" and reader.called
    assert [merged[i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert json.loads(merged[0]["arguments"]) == {"city": "Paris"}
    assert all(merged[i]["id"].startswith("chatcmpl-tool-") for i in (0, 1))
    assert sum(1 for d in deltas if d.id) == 2  # id and name once per call
    assert tool_calls.finish_reason(tr, reader, "stop") == "tool_calls"


def test_whole_calls_are_sent_as_each_array_element_closes() -> None:
    reader = ToolCallReader(
        ToolRequest(tools=[WEATHER, CLOCK], choice="required"), whole_calls=True
    )
    first = '[{"name": "get_weather", "parameters": {"city": "Par'
    assert reader.feed(first, []) == ("", [])
    _, calls = reader.feed('is, {[\\"x"}}, ', [])  # braces inside a string do not close it
    assert [(c.index, c.name) for c in calls] == [(0, "get_weather")]
    assert json.loads(calls[0].arguments) == {"city": 'Paris, {["x'}
    _, calls = reader.feed('{"name": "get_time", "parameters": {}}]', [])
    assert [(c.index, c.name, c.arguments) for c in calls] == [(1, "get_time", "{}")]
    assert reader.called and reader.feed("", []) == ("", [])


def test_named_call_streams_its_arguments() -> None:
    tr = ToolRequest(tools=[WEATHER], choice="function", name="get_weather")
    reader = ToolCallReader(tr)
    _, deltas = _stream(reader, '{"city": "Paris"}')
    merged = _merge(deltas)
    assert merged[0]["name"] == "get_weather" and json.loads(merged[0]["arguments"])
    assert tool_calls.finish_reason(tr, reader, "stop") == "stop"  # as OpenAI ends named calls


def test_required_cut_short_reports_no_call() -> None:
    reader = ToolCallReader(ToolRequest(tools=[WEATHER], choice="required"))
    content, calls = reader.final('[{"name": "get_weather", "parame')
    assert calls == [] and not reader.called and content.startswith("[")


def test_default_parser_by_family() -> None:
    assert (
        tool_calls.default_parser(model_type="qwen2", name="Qwen/Qwen2.5-7B-Instruct") == "hermes"
    )
    assert tool_calls.default_parser(model_type="llama", name="meta-llama/Llama-3.1-8B") == (
        "llama3_json"
    )
    assert tool_calls.default_parser(model_type="llama", name="smollm2-135m-instruct") == ""


def test_structured_output_constraints() -> None:
    one = sampling_from_proto(
        pb.SamplingParams(structured=pb.StructuredOutput(json_schema='{"type": "object"}'))
    )
    assert one.structured is not None and one.structured.json_schema == {"type": "object"}
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        sampling_from_proto(pb.SamplingParams(structured=pb.StructuredOutput(json_schema="{")))
    with pytest.raises(InvalidRequestError, match="one structured-output constraint"):
        sampling_from_proto(
            pb.SamplingParams(structured=pb.StructuredOutput(regex="a+", choice=["a"]))
        )
