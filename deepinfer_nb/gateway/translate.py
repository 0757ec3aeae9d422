"""Pure translation between OpenAI requests/responses and the engine's protobuf messages.

No I/O here: requests become `pb.ChatRequest` / `pb.GenerateRequest` / `pb.EmbeddingRequest`,
engine replies become OpenAI response models, and streamed engine events become the OpenAI SSE
chunks (`ChatChunks`, `CompletionChunks`). Parameters OpenAI defines but the engine cannot honour
are rejected with a 400 naming them instead of being silently dropped.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Sequence

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
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ResponseFormat,
    SamplingFields,
    TokenLogprobOut,
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
    if response_format is not None:
        if response_format.type not in _FORMATS:
            raise invalid(
                f"response_format {response_format.type} is not supported "
                "(use text or json_object)",
                param="response_format",
            )
        s.response_format = _FORMATS[response_format.type]
    return s


def chat_request(req: ChatCompletionRequest, request_id: str) -> pb.ChatRequest:
    if req.tools:
        raise invalid("tools are not supported by this gateway", param="tools")
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
            pb.ChatMessage(role=_ROLES.get(m.role, m.role), content=content, name=m.name or "")
        )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling(
        req,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        logprobs=logprobs,
        response_format=req.response_format,
    )
    return pb.ChatRequest(request_id=request_id, messages=messages, sampling=params)


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
    if req.dimensions is not None:
        raise invalid("dimensions is not supported", param="dimensions")
    inputs = [req.input] if isinstance(req.input, str) else req.input
    if not inputs or not all(isinstance(x, str) for x in inputs):
        raise invalid("input must be a string or a non-empty list of strings", param="input")
    return pb.EmbeddingRequest(request_id=request_id, input=inputs)  # type: ignore[arg-type]


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
            message=ChatMessageOut(content=c.text),
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


def embedding_response(
    resp: pb.EmbeddingResponse, *, model: str, base64_out: bool
) -> EmbeddingResponse:
    data = []
    for e in resp.data:
        values = list(e.values)
        vector: list[float] | str = (
            base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
            if base64_out
            else values
        )
        data.append(EmbeddingData(index=e.index, embedding=vector))
    return EmbeddingResponse(data=data, model=model, usage=usage(resp.usage))


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
            if d.text or d.logprobs:
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
        return {
            "index": d.index,
            "delta": {"content": d.text},
            "logprobs": lp,
            "finish_reason": None,
        }

    def _finish(self, index: int, reason: str) -> str:
        self.finished.add(index)
        return self._chunk(
            [{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]
        )


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
