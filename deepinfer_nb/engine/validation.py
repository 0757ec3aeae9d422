"""Request validation for the shim: turns proto requests into checked, engine-neutral values.

Pure functions, no vLLM and no gRPC: every rule a user can break raises `InvalidRequestError`
with a message that names the field and the allowed range (the server maps it to
INVALID_ARGUMENT). The context-window rule needs the prompt length, so it is a separate step
run after tokenisation.
"""

from __future__ import annotations

import dataclasses
import json

from .._proto import engine_service_pb2 as pb
from ..errors import InvalidRequestError

ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Validated sampling settings; `max_tokens` None means "the rest of the context window"."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None
    json_object: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    structured: Structured | None = None


@dataclasses.dataclass(frozen=True)
class Structured:
    """One constraint for structured outputs (vLLM's `StructuredOutputsParams`)."""

    json_schema: dict[str, object] | None = None
    regex: str = ""
    choice: tuple[str, ...] = ()
    grammar: str = ""


def structured_from_proto(s: pb.StructuredOutput) -> Structured | None:
    """The constraint the request sets, checked; None when it sets none."""
    given = [n for n in ("json_schema", "regex", "choice", "grammar") if getattr(s, n)]
    if len(given) > 1:
        raise InvalidRequestError(
            f"give one structured-output constraint, not {' and '.join(given)}"
        )
    if not given:
        return None
    schema = None
    if s.json_schema:
        try:
            schema = json.loads(s.json_schema)
        except ValueError as exc:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise InvalidRequestError("the JSON schema must be a JSON object")
    return Structured(json_schema=schema, regex=s.regex, choice=tuple(s.choice), grammar=s.grammar)


def sampling_from_proto(params: pb.SamplingParams) -> Sampling:
    """Check every field a user sets; unset optional fields take vLLM's defaults."""
    has = params.HasField
    temperature = params.temperature if has("temperature") else 1.0
    if temperature < 0:
        raise InvalidRequestError(f"temperature must be >= 0, got {temperature:g}")
    top_p = params.top_p if has("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p:g}")
    n = params.n if has("n") else 1
    if n < 1:
        raise InvalidRequestError(f"n must be >= 1, got {n}")
    max_tokens = params.max_tokens if has("max_tokens") else None
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
    top_k = params.top_k if has("top_k") else 0
    if top_k < -1:
        raise InvalidRequestError(f"top_k must be -1, 0 (disabled) or positive, got {top_k}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name) if has(name) else 0.0
        if not -2 <= value <= 2:
            raise InvalidRequestError(f"{name} must be in [-2, 2], got {value:g}")
    if any(not s for s in params.stop):
        raise InvalidRequestError("stop strings must not be empty")
    min_tokens = params.min_tokens if has("min_tokens") else 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise InvalidRequestError(f"min_tokens ({min_tokens}) must be <= max_tokens ({max_tokens})")
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        presence_penalty=params.presence_penalty if has("presence_penalty") else 0.0,
        frequency_penalty=params.frequency_penalty if has("frequency_penalty") else 0.0,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        n=n,
        seed=params.seed if has("seed") else None,
        json_object=params.response_format == pb.RESPONSE_FORMAT_JSON_OBJECT,
        logprobs=params.logprobs if has("logprobs") else None,
        min_tokens=min_tokens,
        ignore_eos=params.ignore_eos if has("ignore_eos") else False,
        structured=structured_from_proto(params.structured) if has("structured") else None,
    )


def messages_from_proto(messages: list[pb.ChatMessage]) -> list[dict[str, object]]:
    """Chat messages as the tokenizer's chat template expects them (tool-call arguments as
    objects, as vLLM's server hands them to templates)."""
    if not messages:
        raise InvalidRequestError("messages must contain at least one message")
    out = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            allowed = ", ".join(sorted(ROLES))
            raise InvalidRequestError(
                f"messages[{i}].role {message.role!r} is not one of: {allowed}"
            )
        item: dict[str, object] = {"role": message.role, "content": message.content}
        if message.name:
            item["name"] = message.name
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            item["tool_calls"] = [_tool_call(i, tc) for tc in message.tool_calls]
        out.append(item)
    return out


def _tool_call(i: int, tc: pb.ToolCall) -> dict[str, object]:
    try:
        arguments = json.loads(tc.arguments) if tc.arguments else {}
    except ValueError:
        raise InvalidRequestError(
            f"messages[{i}].tool_calls: arguments of {tc.name!r} are not valid JSON"
        ) from None
    return {
        "id": tc.id,
        "type": "function",
        "function": {"name": tc.name, "arguments": arguments},
    }


def fit_context(sampling: Sampling, *, prompt_tokens: int, max_model_len: int) -> Sampling:
    """Resolve max_tokens against the context window; reject what cannot fit."""
    if prompt_tokens == 0:
        raise InvalidRequestError("the prompt is empty")
    room = max_model_len - prompt_tokens
    if room < 1:
        raise InvalidRequestError(
            f"the prompt has {prompt_tokens} tokens; the context window is {max_model_len}"
        )
    if sampling.max_tokens is None:
        return dataclasses.replace(sampling, max_tokens=room)
    if sampling.max_tokens > room:
        raise InvalidRequestError(
            f"max_tokens {sampling.max_tokens} plus the prompt's {prompt_tokens} tokens exceeds "
            f"the context window of {max_model_len} (at most {room} here)"
        )
    return sampling
