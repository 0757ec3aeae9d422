"""Function calling in the shim: what a `tool_choice` asks of the engine, and how the generated
text becomes OpenAI tool calls.

As vLLM's own OpenAI server does it (vllm/tool_parsers/): `required` and a named function are
enforced with structured outputs (a JSON schema built from the tools), so they work on any model;
`auto` lets the model choose and reads its calls back with the deployment's vLLM tool parser
(`--tool-call-parser`, e.g. hermes for Qwen). The parsing helpers come from vLLM and are imported
only when a request uses tools.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from .._proto import engine_service_pb2 as pb
from ..errors import InvalidRequestError

CHOICES = ("none", "auto", "required", "function")


class ToolParserMissingError(InvalidRequestError):
    """`tool_choice: auto` on an engine started without a tool parser."""


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    """The validated tools of one chat request."""

    tools: list[dict[str, Any]]
    choice: str  # none | auto | required | function
    name: str = ""  # the forced function, when choice is "function"
    parallel: bool = True

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema that forces a call (required / named); None lets the model choose."""
        if self.choice == "function":
            return _parameters(self._tool(self.name))
        if self.choice != "required":
            return None
        schema: dict[str, Any] = {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "anyOf": [
                    {
                        "properties": {
                            "name": {"type": "string", "enum": [t["function"]["name"]]},
                            "parameters": _parameters(t),
                        },
                        "required": ["name", "parameters"],
                    }
                    for t in self.tools
                ],
            },
        }
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def _tool(self, name: str) -> dict[str, Any]:
        return next(t for t in self.tools if t["function"]["name"] == name)


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters")
    return params if params else {"type": "object", "properties": {}}


def tool_request_from_proto(request: pb.ChatRequest) -> ToolRequest | None:
    """None when the request has no tools; else its tools, checked as vLLM's server checks them."""
    choice = request.tool_choice
    if choice and choice not in CHOICES:
        raise InvalidRequestError(f"tool_choice {choice!r} is not one of: {', '.join(CHOICES)}")
    if not request.tools_json:
        if choice not in ("", "none"):
            raise InvalidRequestError("tool_choice needs tools: the request has none")
        return None
    try:
        tools = json.loads(request.tools_json)
    except ValueError as exc:
        raise InvalidRequestError(f"tools is not valid JSON: {exc}") from None
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be an array of function tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequestError(f"tools[{i}] must be {{'type': 'function', 'function': ...}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError(f"tools[{i}].function.name must be a non-empty string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError(
                f"tools[{i}].function.parameters must be a JSON schema object"
            )
    tr = ToolRequest(
        tools=tools,
        choice=choice or "auto",
        name=request.tool_choice_name,
        parallel=request.parallel_tool_calls,
    )
    if tr.choice == "function" and tr.name not in tr.names:
        raise InvalidRequestError(
            f"tool_choice names the function {tr.name!r}, which is not in tools "
            f"({', '.join(tr.names)})"
        )
    return tr


_DECODER = json.JSONDecoder()


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ToolCallReader:
    """Turns one choice's generated text into content and tool calls, streamed or at the end.

    `feed()` takes each text delta and returns the content delta and the tool-call deltas to
    send now (a call's first delta has its id and name, later ones only new argument text);
    `final()` parses a whole text for a unary answer.
    """

    def __init__(
        self, request: ToolRequest, *, parser: Any = None, whole_calls: bool = False
    ) -> None:
        self.request = request
        self._parser = parser  # a vLLM ToolParser instance, for choice "auto"
        # `required` streamed without vLLM (llama.cpp): each call is sent whole, arguments and
        # all, as soon as its element of the JSON array closes
        self._whole_calls = whole_calls
        self._scan = 0  # where the next unread array element starts (whole_calls)
        self._sent = 0
        self._vllm_request: Any = None
        self._text = ""
        self._ids: list[int] = []
        self._ids_by_index: dict[int, str] = {}
        self.called = False

    def feed(self, delta: str, token_ids: list[int]) -> tuple[str, list[pb.ToolCall]]:
        previous, self._text = self._text, self._text + delta
        prev_ids = list(self._ids)
        self._ids.extend(token_ids)
        choice = self.request.choice
        if choice == "function":
            if not delta and self.called:
                return "", []
            call = pb.ToolCall(index=0, arguments=delta)
            if not self.called:
                call.id, call.name = call_id(), self.request.name
                self.called = True
            return "", [call]
        if choice == "required":
            return "", self._whole_delta() if self._whole_calls else self._required_delta(previous)
        if choice == "auto" and self._parser is not None:
            return self._auto_delta(previous, delta, prev_ids, token_ids)
        return delta, []

    def final(self, text: str) -> tuple[str, list[pb.ToolCall]]:
        choice = self.request.choice
        if choice == "function":
            self.called = True
            return "", [pb.ToolCall(index=0, id=call_id(), name=self.request.name, arguments=text)]
        if choice == "required":
            try:
                items = json.loads(text)
            except ValueError:  # cut short (max_tokens): no complete call to report
                return text, []
            calls = [
                pb.ToolCall(
                    index=i,
                    id=call_id(),
                    name=item["name"],
                    arguments=json.dumps(item["parameters"], ensure_ascii=False),
                )
                for i, item in enumerate(items)
            ]
            self.called = bool(calls)
            return "", calls
        if choice == "auto" and self._parser is not None:
            info = self._parser.extract_tool_calls(text, self._request())
            if not info.tools_called:
                return text, []
            self.called = True
            calls = [
                pb.ToolCall(
                    index=i,
                    id=tc.id or call_id(),
                    name=tc.function.name,
                    arguments=tc.function.arguments,
                )
                for i, tc in enumerate(info.tool_calls)
            ]
            return info.content or "", calls
        return text, []

    def _whole_delta(self) -> list[pb.ToolCall]:
        """The calls of the `required` array completed since the last delta, each whole."""
        calls = []
        for item in self._completed_items():
            calls.append(
                pb.ToolCall(
                    index=self._sent,
                    id=call_id(),
                    name=item["name"],
                    arguments=json.dumps(item["parameters"], ensure_ascii=False),
                )
            )
            self._sent += 1
        self.called = self.called or bool(calls)
        return calls

    def _completed_items(self) -> list[dict[str, Any]]:
        """Array elements that closed since the last call. The grammar makes every element an
        object with name and parameters, so an element decodes only once it is complete."""
        text = self._text
        items: list[dict[str, Any]] = []
        if not self._scan:
            opening = text.find("[")
            if opening < 0:
                return []
            self._scan = opening + 1
        while True:
            pos = self._scan
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            try:
                item, self._scan = _DECODER.raw_decode(text, pos)
            except ValueError:
                return items
            items.append(item)

    def _required_delta(self, previous: str) -> list[pb.ToolCall]:
        from vllm.tool_parsers.streaming import extract_required_tool_call_streaming

        message, _ = extract_required_tool_call_streaming(
            previous_text=previous,
            current_text=self._text,
            tool_call_idx=None,
            tool_call_id_type="random",
        )
        return self._calls(message)

    def _auto_delta(
        self, previous: str, delta: str, prev_ids: list[int], delta_ids: list[int]
    ) -> tuple[str, list[pb.ToolCall]]:
        message = self._parser.extract_tool_calls_streaming(
            previous_text=previous,
            current_text=self._text,
            delta_text=delta,
            previous_token_ids=prev_ids,
            current_token_ids=list(self._ids),
            delta_token_ids=delta_ids,
            request=self._request(),
        )
        if message is None:
            return "", []
        return message.content or "", self._calls(message)

    def _calls(self, message: Any) -> list[pb.ToolCall]:
        if message is None:
            return []
        out = []
        for tc in message.tool_calls or []:
            fn = tc.function
            call = pb.ToolCall(
                index=tc.index,
                arguments=(fn.arguments or "") if fn else "",
            )
            if tc.index not in self._ids_by_index and fn is not None and fn.name:
                self._ids_by_index[tc.index] = tc.id or call_id()
                call.id, call.name = self._ids_by_index[tc.index], fn.name
            out.append(call)
        self.called = self.called or bool(out)
        return out

    def _request(self) -> Any:
        """vLLM's request object, which its tool parsers read the tools from."""
        if self._vllm_request is None:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

            self._vllm_request = ChatCompletionRequest.model_validate(
                {
                    "model": "shim",
                    "messages": [{"role": "user", "content": ""}],
                    "tools": self.request.tools,
                    "tool_choice": "auto",
                }
            )
        return self._vllm_request


def finish_reason(request: ToolRequest | None, reader: ToolCallReader | None, reason: str) -> str:
    """OpenAI's finish_reason: "tool_calls" when `auto` or `required` ended in calls (a named
    function ends in "stop", as in OpenAI's API and vLLM's server)."""
    if (
        request is not None
        and reader is not None
        and reader.called
        and request.choice in ("auto", "required")
        and reason == "stop"
    ):
        return "tool_calls"
    return reason


def make_parser(name: str, tokenizer: Any) -> Any:
    """An instance of vLLM's tool parser `name` (per request: parsers keep stream state)."""
    from vllm.tool_parsers.abstract_tool_parser import ToolParserManager

    try:
        cls = ToolParserManager.get_tool_parser(name)
    except KeyError:
        known = ", ".join(sorted(ToolParserManager.list_registered()))
        raise InvalidRequestError(f"unknown tool parser {name!r}; vLLM knows: {known}") from None
    return cls(tokenizer)


def parser_names() -> list[str]:
    from vllm.tool_parsers.abstract_tool_parser import ToolParserManager

    return sorted(ToolParserManager.list_registered())


# Model families whose tool-call format vLLM parses, matched on config.json's model_type and the
# model's name (the name decides within a type: model_type "llama" is Llama 3 and SmolLM2 alike).
_FAMILY_PARSERS: tuple[tuple[str, str, str], ...] = (
    # (model_type, name contains, parser)
    ("qwen2", "", "hermes"),
    ("qwen2_moe", "", "hermes"),
    ("qwen3", "", "hermes"),
    ("qwen3_moe", "", "hermes"),
    ("llama", "llama-3", "llama3_json"),
    ("llama", "llama3", "llama3_json"),
    ("llama", "hermes", "hermes"),
    ("mistral", "", "mistral"),
    ("granite", "", "granite"),
    ("internlm2", "", "internlm"),
    ("jamba", "", "jamba"),
    ("phi3", "phi-4-mini", "phi4_mini_json"),
)


def default_parser(*, model_type: str, name: str) -> str:
    """The vLLM tool parser for a model family, or "" where none is known."""
    low = name.lower()
    for mtype, needle, parser in _FAMILY_PARSERS:
        if model_type == mtype and needle in low:
            return parser
    return ""
