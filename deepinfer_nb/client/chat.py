"""Chat plumbing shared by the Python API and the inline chat magic.

`ChatStream` turns an async stream of engine events running on the runtime loop into a plain
iterator of text deltas for the kernel's main thread: each step is one `Runtime.run` call, so a
KeyboardInterrupt cancels the step on the loop, which closes the gRPC stream; the hosted stream
also sends an explicit Cancel, so the engine aborts the vLLM request either way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from .._proto import engine_service_pb2 as pb

T = TypeVar("T")


class Runner(Protocol):
    """Runs a coroutine on the runtime loop and waits for it (`runtime.Runtime`; chat never
    imports it)."""

    def run(self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None) -> T: ...


@dataclasses.dataclass
class ChatDelta:
    """One streamed piece of an answer (the final one carries usage and finish_reason)."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    engine: str = ""
    finished: bool = False


@dataclasses.dataclass
class ChatResult:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    ttft_s: float = 0.0
    finish_reason: str = ""
    engine: str = ""

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: completion tokens over the time after the first token."""
        span = self.elapsed_s - self.ttft_s
        return self.completion_tokens / span if span > 0 and self.completion_tokens else 0.0

    def usage_line(self) -> str:
        parts = [
            f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens",
            f"{self.elapsed_s:.2f} s",
        ]
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        if self.ttft_s:
            parts.append(f"TTFT {self.ttft_s * 1000:.0f} ms")
        if self.engine:
            parts.append(self.engine)
        if self.finish_reason and self.finish_reason != "stop":
            parts.append(f"finish: {self.finish_reason}")
        return " · ".join(parts)

    def __str__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return f"{self.text}\n\n*{self.usage_line()}*"


def build_request(
    messages: Sequence[dict[str, str]],
    *,
    max_tokens: int | None,
    temperature: float | None,
    request_id: str = "",
) -> pb.ChatRequest:
    from .._proto import engine_service_pb2 as pb

    sampling = pb.SamplingParams()
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    return pb.ChatRequest(
        request_id=request_id,
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        sampling=sampling,
    )


_END = object()


class ChatStream:
    """Iterate for text deltas; `.result` is the finished `ChatResult` once the stream ended."""

    def __init__(
        self,
        runtime: Runner | None,
        events: AsyncIterator[ChatDelta] | None,
        *,
        timeout: float = 300.0,
        on_done: Callable[[ChatResult], None] | None = None,
    ) -> None:
        self._runtime = runtime
        self._events = events
        self._timeout = timeout
        self._on_done = on_done
        self.result: ChatResult | None = None
        self.text = ""

    @classmethod
    def finished(cls, result: ChatResult) -> ChatStream:
        stream = cls(None, None)
        stream.result = result
        stream.text = result.text
        return stream

    def __iter__(self) -> Iterator[str]:
        if self._events is None or self._runtime is None:
            if self.result is not None and self.result.text:
                yield self.result.text
            return
        events, runtime = self._events, self._runtime
        self._events = None  # one pass only
        t0 = time.monotonic()
        last = ChatDelta()
        try:
            while True:
                item = runtime.run(_next(events), timeout=self._timeout)
                if item is _END:
                    break
                assert isinstance(item, ChatDelta)
                last = item
                if item.text:
                    self.text += item.text
                    yield item.text
        finally:
            # closing on the loop cancels the gRPC call and sends Cancel if it did not finish
            runtime.run(_aclose(events), timeout=10)
        self.result = ChatResult(
            text=self.text,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            elapsed_s=time.monotonic() - t0,
            ttft_s=last.ttft_s,
            finish_reason=last.finish_reason,
            engine=last.engine,
        )
        if self._on_done is not None:
            self._on_done(self.result)


async def _next(events: AsyncIterator[ChatDelta]) -> Any:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return _END


async def _aclose(events: AsyncIterator[ChatDelta]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def delta_from_event(event: Any, *, engine: str, ttft_s: float) -> ChatDelta:
    """A `ChatDelta` from one `pb.GenerateStreamResponse` (choice 0)."""
    text = "".join(c.text for c in event.deltas if c.index == 0)
    finish = next((c.finish_reason for c in event.deltas if c.finish_reason), "")
    return ChatDelta(
        text=text,
        finish_reason=finish,
        prompt_tokens=event.usage.prompt_tokens,
        completion_tokens=event.usage.completion_tokens,
        ttft_s=ttft_s,
        engine=engine,
        finished=event.finished,
    )
