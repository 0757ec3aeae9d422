"""Pure translation between OpenAI requests/responses and the engine's protobuf messages.

No I/O here: requests become `pb.ChatRequest` / `pb.GenerateRequest` / `pb.EmbeddingRequest`,
engine replies become OpenAI response models, and streamed engine events become the OpenAI SSE
chunks (`ChatChunks`, `CompletionChunks`). Parameters OpenAI defines but the engine cannot honour
are rejected with a 400 naming them instead of being silently dropped.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from .._proto import engine_service_pb2 as pb
from .errors import invalid
from .protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    FunctionCall,
    NamedToolChoice,
    ResponseFormat,
    SamplingFields,
    TokenLogprobOut,
    ToolCallOut,
    TopLogprobOut,
    Usage,
)

_ROLES = {"developer": "system"}
_FORMATS = {"text": pb.RESPONSE_FORMAT_TEXT, "json_object": pb.RESPONSE_FORMAT_JSON_OBJECT}


# ---- requests ----------------------------------------------------------------------------------


def sampling(
    req: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    response_format: ResponseFormat | None,
) -> pb.SamplingParams:
    if req.logit_bias:
        raise invalid("logit_bias is not supported", param="logit_bias")
    s = pb.SamplingParams(n=req.n)
    for field in (
        "temperature",
        "top_p",
        "top_k",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "min_tokens",
        "ignore_eos",
    ):
        value = getattr(req, field)
        if value is not None:
            setattr(s, field, value)
    if max_tokens is not None:
        s.max_tokens = max_tokens
    if logprobs is not None:
        s.logprobs = logprobs
    if req.stop:
        s.stop.extend([req.stop] if isinstance(req.stop, str) else req.stop)
    if req.stop_token_ids:
        s.stop_token_ids.extend(req.stop_token_ids)
    structured = structured_output(req, response_format)
    if structured is not None:
        s.structured.CopyFrom(structured)
    elif response_format is not None and response_format.type in _FORMATS:
        s.response_format = _FORMATS[response_format.type]
    return s


def structured_output(
    req: SamplingFields, response_format: ResponseFormat | None
) -> pb.StructuredOutput | None:
    """The one structured-output constraint a request sets, from `response_format`
    json_schema, vLLM's `structured_outputs`, or its older `guided_*` fields."""
    found: list[tuple[str, pb.StructuredOutput]] = []
    if response_format is not None and response_format.type == "json_schema":
        spec = response_format.json_schema
        if spec is None or not isinstance(spec.json_schema, dict):
            raise invalid(
                "response_format json_schema needs json_schema.schema (a JSON Schema object)",
                param="response_format.json_schema",
            )
        found.append(("response_format", pb.StructuredOutput(json_schema=_dumps(spec.json_schema))))
    so = req.structured_outputs
    if so is not None:
        if so.json_ is not None:
            found.append(
                ("structured_outputs.json", pb.StructuredOutput(json_schema=_schema(so.json_)))
            )
        if so.regex:
            found.append(("structured_outputs.regex", pb.StructuredOutput(regex=so.regex)))
        if so.choice:
            found.append(("structured_outputs.choice", pb.StructuredOutput(choice=so.choice)))
        if so.grammar:
            found.append(("structured_outputs.grammar", pb.StructuredOutput(grammar=so.grammar)))
    if req.guided_json is not None:
        found.append(("guided_json", pb.StructuredOutput(json_schema=_schema(req.guided_json))))
    if req.guided_regex:
        found.append(("guided_regex", pb.StructuredOutput(regex=req.guided_regex)))
    if req.guided_choice:
        found.append(("guided_choice", pb.StructuredOutput(choice=req.guided_choice)))
    if req.guided_grammar:
        found.append(("guided_grammar", pb.StructuredOutput(grammar=req.guided_grammar)))
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise invalid(f"give one structured-output constraint, not {names}", param=found[1][0])
    return found[0][1] if found else None


def _schema(value: dict[str, Any] | str) -> str:
    return value if isinstance(value, str) else _dumps(value)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def chat_request(req: ChatCompletionRequest, request_id: str) -> pb.ChatRequest:
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs requires logprobs to be true", param="top_logprobs")
    messages = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            parts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise invalid(
                        f"content part type {part.type!r} is not supported",
                        param=f"messages.{i}.content",
                    )
                parts.append(part.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        messages.append(
            pb.ChatMessage(
                role=_ROLES.get(m.role, m.role),
                content=content,
                name=m.name or "",
                tool_call_id=m.tool_call_id or "",
                tool_calls=[
                    pb.ToolCall(
                        index=k, id=tc.id, name=tc.function.name, arguments=tc.function.arguments
                    )
                    for k, tc in enumerate(m.tool_calls or [])
                ],
            )
        )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling(
        req,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        logprobs=logprobs,
        response_format=req.response_format,
    )
    out = pb.ChatRequest(request_id=request_id, messages=messages, sampling=params)
    _tools(req, out)
    return out


def _tools(req: ChatCompletionRequest, out: pb.ChatRequest) -> None:
    """Tools and tool_choice, checked as OpenAI checks them (the shim enforces them)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise invalid("tool_choice needs tools: the request has none", param="tool_choice")
        return
    out.tools_json = _dumps([t.model_dump(exclude_none=True) for t in req.tools])
    out.parallel_tool_calls = req.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        names = [t.function.name for t in req.tools]
        if choice.function.name not in names:
            raise invalid(
                f"tool_choice names the function {choice.function.name!r}, which is not in "
                f"tools ({', '.join(names)})",
                param="tool_choice",
            )
        out.tool_choice, out.tool_choice_name = "function", choice.function.name
    else:
        out.tool_choice = choice or "auto"


def completion_requests(req: CompletionRequest, request_id: str) -> list[pb.GenerateRequest]:
    """One engine request per prompt (OpenAI accepts a batch of prompts)."""
    if req.echo:
        raise invalid("echo is not supported", param="echo")
    if req.suffix:
        raise invalid("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise invalid("best_of other than n is not supported", param="best_of")
    prompt = req.prompt
    if not prompt:
        raise invalid("prompt must not be empty", param="prompt")
    batch: Sequence[str | list[int]]
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        batch = [prompt]
    else:
        batch = prompt
    if req.stream and len(batch) > 1:
        raise invalid("streaming accepts one prompt per request", param="prompt")
    params = sampling(
        req, max_tokens=req.max_tokens, logprobs=req.logprobs, response_format=req.response_format
    )
    out = []
    for i, p in enumerate(batch):
        rid = request_id if len(batch) == 1 else f"{request_id}-{i}"
        if isinstance(p, str):
            out.append(pb.GenerateRequest(request_id=rid, prompt=p, sampling=params))
        else:
            if not p:
                raise invalid(f"prompt {i} is empty", param="prompt")
            out.append(pb.GenerateRequest(request_id=rid, prompt_token_ids=p, sampling=params))
    return out


def embedding_request(req: EmbeddingRequest, request_id: str) -> pb.EmbeddingRequest:
    """One engine request for the whole input: a string, strings, token ids, or lists of them."""
    if req.dimensions is not None:
        raise invalid("dimensions is not supported", param="dimensions")
    given = req.input
    if isinstance(given, str):
        return pb.EmbeddingRequest(request_id=request_id, input=[given])
    if not given:
        raise invalid("input must not be empty", param="input")
    if all(isinstance(x, str) for x in given):
        return pb.EmbeddingRequest(request_id=request_id, input=given)  # type: ignore[arg-type]
    batch: list[list[int]]
    if all(isinstance(x, int) for x in given):
        batch = [list(given)]  # type: ignore[arg-type]
    elif all(isinstance(x, list) for x in given):
        batch = list(given)  # type: ignore[arg-type]
    else:
        raise invalid(
            "input must be a string, a list of strings, a list of token ids, or a list of them",
            param="input",
        )
    if any(not ids or min(ids) < 0 for ids in batch):
        raise invalid("token-id inputs must be non-empty lists of ids >= 0", param="input")
    return pb.EmbeddingRequest(
        request_id=request_id, input_ids=[pb.TokenIds(ids=ids) for ids in batch]
    )


# ---- responses ---------------------------------------------------------------------------------


def usage(u: pb.Usage) -> Usage:
    return Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens or u.prompt_tokens + u.completion_tokens,
    )


def chat_logprobs(items: Sequence[pb.TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            TokenLogprobOut(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[
                    TopLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()))
                    for t in lp.top
                ],
            )
            for lp in items
        ]
    )


def completion_logprobs(items: Sequence[pb.TokenLogprob], *, offset: int = 0) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for lp in items:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({t.token: t.logprob for t in lp.top})
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out


def chat_response(
    resp: pb.GenerateResponse, *, id: str, model: str, logprobs: bool
) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=c.index,
            message=ChatMessageOut(
                # with tool calls and nothing besides them, content is null as in OpenAI's API
                content=c.text if c.text or not c.tool_calls else None,
                tool_calls=[
                    ToolCallOut(
                        id=tc.id, function=FunctionCall(name=tc.name, arguments=tc.arguments)
                    )
                    for tc in c.tool_calls
                ],
            ),
            logprobs=chat_logprobs(c.logprobs) if logprobs else None,
            finish_reason=c.finish_reason or "stop",
        )
        for c in resp.choices
    ]
    return ChatCompletionResponse(id=id, model=model, choices=choices, usage=usage(resp.usage))


def completion_response(
    replies: Sequence[pb.GenerateResponse], *, id: str, model: str, n: int, logprobs: bool
) -> CompletionResponse:
    choices, total = [], Usage()
    for i, resp in enumerate(replies):
        for c in resp.choices:
            choices.append(
                CompletionChoice(
                    index=i * n + c.index,
                    text=c.text,
                    logprobs=completion_logprobs(c.logprobs) if logprobs else None,
                    finish_reason=c.finish_reason or "stop",
                )
            )
        u = usage(resp.usage)
        total.prompt_tokens += u.prompt_tokens
        total.completion_tokens += u.completion_tokens
        total.total_tokens += u.total_tokens
    return CompletionResponse(id=id, model=model, choices=choices, usage=total)


def embedding_json(resp: pb.EmbeddingResponse, *, model: str, base64_out: bool) -> bytes:
    """The OpenAI embeddings response (`EmbeddingResponse`'s shape) as JSON bytes, built from the
    engine's float32 bytes: base64 is those bytes encoded; floats are written by orjson from a
    numpy view of them (each float32 in its shortest round-trip form), so no Python float is made
    per dimension (that path cost about 30 ms per 256 vectors of 384)."""
    data = [
        {
            "object": "embedding",
            "index": e.index,
            "embedding": base64.b64encode(e.float32_le).decode()
            if base64_out
            else np.frombuffer(e.float32_le, dtype="<f4"),
        }
        for e in resp.data
    ]
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": usage(resp.usage).model_dump(),
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


# ---- streaming ---------------------------------------------------------------------------------


def sse(payload: object) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


class _Chunks:
    """Shared state of one streamed response: ids, usage, which choices have finished."""

    kind = ""

    def __init__(self, *, id: str, model: str, n: int, logprobs: bool, include_usage: bool) -> None:
        self.id = id
        self.model = model
        self.n = n
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.created = int(time.time())
        self.usage: Usage | None = None
        self.finished: set[int] = set()

    def _chunk(self, choices: list[dict[str, object]], **extra: object) -> str:
        return sse(
            {
                "id": self.id,
                "object": self.kind,
                "created": self.created,
                "model": self.model,
                "choices": choices,
                **extra,
            }
        )

    def start(self) -> list[str]:
        return []

    def event(self, ev: pb.GenerateStreamResponse) -> list[str]:
        out = []
        for d in ev.deltas:
            if d.text or d.logprobs or d.tool_calls:
                out.append(self._chunk([self._delta(d)]))
            if d.finish_reason:
                out.append(self._finish(d.index, d.finish_reason))
        if ev.HasField("usage") and ev.finished:
            self.usage = usage(ev.usage)
        return out

    def end(self) -> list[str]:
        # a choice the engine ended without a finish_reason still gets its final chunk
        out = [self._finish(i, "stop") for i in range(self.n) if i not in self.finished]
        if self.include_usage:
            out.append(self._chunk([], usage=(self.usage or Usage()).model_dump()))
        out.append(DONE)
        return out

    def _delta(self, d: pb.Choice) -> dict[str, object]:
        raise NotImplementedError

    def _finish(self, index: int, reason: str) -> str:
        raise NotImplementedError


class ChatChunks(_Chunks):
    kind = "chat.completion.chunk"

    def start(self) -> list[str]:
        return [
            self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(self.n)
        ]

    def _delta(self, d: pb.Choice) -> dict[str, object]:
        lp = chat_logprobs(d.logprobs).model_dump() if self.logprobs else None
        delta: dict[str, object] = {"content": d.text} if d.text or not d.tool_calls else {}
        if d.tool_calls:
            delta["tool_calls"] = [_tool_call_delta(tc) for tc in d.tool_calls]
        return {"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": None}

    def _finish(self, index: int, reason: str) -> str:
        self.finished.add(index)
        return self._chunk(
            [{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]
        )


def _tool_call_delta(tc: pb.ToolCall) -> dict[str, object]:
    """OpenAI's streamed tool call: id, type and name on a call's first delta only."""
    if tc.id:
        return {
            "index": tc.index,
            "id": tc.id,
            "type": "function",
            "function": {"name": tc.name, "arguments": tc.arguments},
        }
    return {"index": tc.index, "function": {"arguments": tc.arguments}}


class CompletionChunks(_Chunks):
    kind = "text_completion"

    def __init__(self, *, id: str, model: str, n: int, logprobs: bool, include_usage: bool) -> None:
        super().__init__(id=id, model=model, n=n, logprobs=logprobs, include_usage=include_usage)
        self.offsets = [0] * n

    def _delta(self, d: pb.Choice) -> dict[str, object]:
        lp = None
        if self.logprobs:
            lp = completion_logprobs(d.logprobs, offset=self.offsets[d.index]).model_dump()
        self.offsets[d.index] += len(d.text)
        return {"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": None}

    def _finish(self, index: int, reason: str) -> str:
        self.finished.add(index)
        return self._chunk(
            [{"index": index, "text": "", "logprobs": None, "finish_reason": reason}]
        )
