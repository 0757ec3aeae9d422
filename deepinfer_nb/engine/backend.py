"""The engine backend interface the shim serves, and the engine-neutral values it speaks.

`EngineBackend` is what `server.py` needs from an inference engine: prompt rendering and
tokenisation, a delta stream per request, abort, embeddings, live stats and model facts.
`vllm_backend.VllmBackend` implements it over vLLM's `AsyncLLM`, `backends.llamacpp.LlamaCppBackend`
over llama-cpp-python; what each can do is listed in `backends.CAPABILITIES`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from .validation import Sampling


@dataclasses.dataclass(frozen=True)
class TopToken:
    token_id: int
    token: str
    logprob: float


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[TopToken, ...] = ()


@dataclasses.dataclass
class ChoiceDelta:
    """New output of one choice since its previous delta."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str = ""  # stop | length | abort, set on the choice's last delta
    stop_reason: str = ""  # the stop string or token id that ended it


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Observations counted per bucket since the engine started: `counts[i]` holds the values in
    (`bounds[i-1]`, `bounds[i]`], the last count (one more than `bounds`) those above them all."""

    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = (0,)
    sum: float = 0.0


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Counters and gauges as the engine's scheduler reports them."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0
    requests_finished_total: int = 0
    prefix_cache_hit_rate: float = 0.0
    time_to_first_token: Histogram = Histogram()
    """Seconds from a request's arrival to its first token."""
    inter_token_latency: Histogram = Histogram()
    """Seconds between a request's consecutive tokens."""


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    model_path: str
    max_model_len: int
    dtype: str
    architecture: str
    vocab_size: int
    task: str  # generate | embed
    tensor_parallel_size: int
    device: str
    engine_version: str
    num_kv_blocks: int
    block_size: int
    tool_call_parser: str = ""  # the vLLM tool parser `tool_choice: auto` uses ("" = none)


class EngineBackend(abc.ABC):
    """One loaded model; every method is safe to call concurrently from the server's loop."""

    name: str = ""
    """Its key in `backends.CAPABILITIES` (the shim checks requests against that entry); empty:
    no checks (test doubles)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model (slow); raises with a user-facing message when it cannot."""

    @abc.abstractmethod
    async def abort_start(self) -> None:
        """Abandon a `start()` in progress (a stop came while loading): end the engine's
        processes so the load fails fast; the caller then cancels `start()` and calls
        `shutdown()`, which must also release an engine that finished loading meanwhile."""

    @abc.abstractmethod
    def facts(self) -> ModelFacts: ...

    @abc.abstractmethod
    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        chat_template: str = "",
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for a conversation, generation prompt appended; the chat template
        receives `tools` (OpenAI function tools) where the request has them."""

    def tool_parser(self) -> Any:
        """A fresh tool-call parser for `tool_choice: auto` (it keeps one stream's state), or
        None when the engine has none."""
        return None

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]: ...

    @abc.abstractmethod
    def generate(
        self, *, request_id: str, prompt_token_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[list[ChoiceDelta]]:
        """Deltas as the engine produces them; closing the iterator aborts the request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    async def embed(self, *, request_id: str, prompt_token_ids: list[int]) -> list[float]: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and its worker processes."""


def settle_from_thread(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any = None,
    exc: BaseException | None = None,
) -> None:
    """Hand a worker thread's outcome (`exc`, else `result`) to `future` on `loop`, if the loop
    still runs: backends load models and run blocking calls in threads."""

    def settle() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
        loop.call_soon_threadsafe(settle)
