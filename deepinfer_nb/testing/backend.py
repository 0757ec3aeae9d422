"""`FakeBackend`: an `EngineBackend` with no model: deterministic tokens, set latency and failures.

It speaks the whole backend contract the shim serves (engine/server.py), so the real servicer,
gRPC server, client, worker and gateway run over it unchanged. Tokens are characters (id =
code point + 3; 1 is BOS), so a prompt's token count is its length plus one. Every choice answers
`reply`, one character per token, then ends with "stop" (EOS) unless `ignore_eos` or `min_tokens`
keep it going (the reply repeats) or `max_tokens` cuts it ("length"). Stop strings and stop token
ids end a choice as vLLM does: the stop string is not in the text, a stop token id is in the ids.
Embeddings (task "embed") are unit vectors that depend only on the input's tokens.

Failures: `start_error` makes `start()` raise; `error` makes every request raise before its first
token; `error_after_tokens` raises `error` (or an `EngineError`) mid-stream. All attributes may be
changed while the backend serves (tests flip them between requests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ..engine.backend import (
    ChoiceDelta,
    EngineBackend,
    EngineStats,
    ModelFacts,
    TokenLogprob,
    TopToken,
)
from ..engine.stats import ITL_BUCKETS, TTFT_BUCKETS, Buckets
from ..engine.validation import Sampling
from ..errors import EngineError, UnsupportedTaskError

__all__ = ["ENV_NAMES", "ENV_PREFIX", "FakeBackend"]

BOS, EOS, OFFSET = 1, 2, 3
VOCAB_SIZE = 0x110000 + OFFSET
ENV_PREFIX = "DEEPINFER_FAKE_"
_ENV_SETTINGS: tuple[tuple[str, type], ...] = (
    ("reply", str),
    ("task", str),
    ("max_model_len", int),
    ("token_latency_s", float),
    ("load_s", float),
    ("embedding_dims", int),
)
ENV_NAMES = tuple(ENV_PREFIX + key.upper() for key, _ in _ENV_SETTINGS)
"""What `FakeBackend.from_env` reads: DEEPINFER_FAKE_REPLY, _TASK, _TOKEN_LATENCY_S, ..."""


def token_id(ch: str) -> int:
    return ord(ch) + OFFSET


def token_text(tid: int) -> str:
    return chr(tid - OFFSET) if tid >= OFFSET else ""


@dataclasses.dataclass
class _Choice:
    index: int
    text: str = ""
    held: str = ""
    count: int = 0
    finish_reason: str = ""
    stop_reason: str = ""


class FakeBackend(EngineBackend):
    """A deterministic engine without a model (see the module docstring)."""

    def __init__(
        self,
        *,
        reply: str = "The capital of France is Paris.",
        task: str = "generate",
        max_model_len: int = 2048,
        token_latency_s: float = 0.0,
        load_s: float = 0.0,
        embedding_dims: int = 8,
        start_error: BaseException | None = None,
        error: BaseException | None = None,
        error_after_tokens: int | None = None,
        model_path: str = "fake",
    ) -> None:
        if not reply:
            raise ValueError("reply must not be empty")
        self.reply = reply
        self.task = task
        self.max_model_len = max_model_len
        self.token_latency_s = token_latency_s
        self.load_s = load_s
        self.embedding_dims = embedding_dims
        self.start_error = start_error
        self.error = error
        self.error_after_tokens = error_after_tokens
        self.model_path = model_path
        self.started = False
        self.closed = False
        self.requests = 0
        """Generation and embedding calls received (those that failed included)."""
        self.aborted: list[str] = []
        """Request ids aborted (by `abort` or by closing their stream), in order."""
        self._running: dict[str, asyncio.Event] = {}
        self._abort_start = asyncio.Event()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._finished = 0
        self._ttft = Buckets(TTFT_BUCKETS)
        self._itl = Buckets(ITL_BUCKETS)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FakeBackend:
        """Settings from DEEPINFER_FAKE_* variables (a deployment's `env` reaches the shim so)."""
        kw: dict[str, object] = {}
        for key, kind in _ENV_SETTINGS:
            raw = env.get(ENV_PREFIX + key.upper())
            if raw is not None:
                kw[key] = kind(raw)
        return cls(**kw)  # type: ignore[arg-type]

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.load_s:
            stop = asyncio.ensure_future(self._abort_start.wait())
            try:
                await asyncio.wait({stop}, timeout=self.load_s)
            finally:
                stop.cancel()
        if self._abort_start.is_set():
            raise EngineError("the fake load was abandoned")
        if self.start_error is not None:
            raise self.start_error
        self.started = True

    async def abort_start(self) -> None:
        self._abort_start.set()

    async def shutdown(self) -> None:
        for stop in self._running.values():
            stop.set()
        self.closed = True

    def facts(self) -> ModelFacts:
        return ModelFacts(
            model_path=self.model_path,
            max_model_len=self.max_model_len,
            dtype="float32",
            architecture="FakeForCausalLM",
            vocab_size=VOCAB_SIZE,
            task=self.task,
            tensor_parallel_size=1,
            device="cpu",
            engine_version="fake",
            num_kv_blocks=self.max_model_len // 16,
            block_size=16,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self._running),
            kv_cache_usage=min(1.0, len(self._running) / 64),
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            requests_finished_total=self._finished,
            time_to_first_token=self._ttft.snapshot(),
            inter_token_latency=self._itl.snapshot(),
        )

    # ---- prompts -----------------------------------------------------------------------------

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        chat_template: str = "",
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Every conversation renders the same way (`chat_template` is not interpreted); tools
        are listed by name first, as a template would show them to the model."""
        names = ",".join(t["function"]["name"] for t in tools or [])
        turns = "".join(f"<|{m['role']}|>{m.get('content', '')}\n" for m in messages)
        return (f"<|tools|>{names}\n" if names else "") + turns + "<|assistant|>"

    def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids = [token_id(ch) for ch in text]
        return [BOS, *ids] if add_special_tokens else ids

    # ---- requests ----------------------------------------------------------------------------

    async def generate(
        self, *, request_id: str, prompt_token_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[list[ChoiceDelta]]:
        self.requests += 1
        if self.error is not None and self.error_after_tokens is None:
            raise self.error
        stop = self._running.setdefault(request_id, asyncio.Event())
        self._prompt_tokens += len(prompt_token_ids)
        choices = [_Choice(i) for i in range(sampling.n)]
        limit = sampling.max_tokens or (self.max_model_len - len(prompt_token_ids))
        emitted = 0
        ended = False
        last = time.monotonic()
        try:
            while any(not c.finish_reason for c in choices):
                await asyncio.sleep(self.token_latency_s)
                if stop.is_set():
                    yield [_aborted(c) for c in choices if not c.finish_reason]
                    break
                if self.error_after_tokens is not None and emitted >= self.error_after_tokens:
                    raise self.error or EngineError("the fake engine failed mid-stream")
                deltas = [self._step(c, sampling, limit) for c in choices if not c.finish_reason]
                emitted += 1
                self._generation_tokens += sum(len(d.token_ids) for d in deltas)
                now = time.monotonic()
                (self._ttft if emitted == 1 else self._itl).observe(now - last)
                last = now
                yield deltas
            ended = True
        finally:
            self._running.pop(request_id, None)
            self._finished += 1
            if not ended:  # closed early (client gone, cancelled) or failed: the request is over
                self.aborted.append(request_id)

    def _step(self, c: _Choice, sampling: Sampling, limit: int) -> ChoiceDelta:
        """The next token of one choice, and its finish when this token ends it."""
        past_reply = c.count >= len(self.reply)
        if past_reply and not sampling.ignore_eos and c.count >= sampling.min_tokens:
            return self._finish(c, ChoiceDelta(index=c.index, token_ids=[EOS]), "stop")
        ch = self.reply[c.count % len(self.reply)]
        tid = token_id(ch)
        c.count += 1
        delta = ChoiceDelta(index=c.index, token_ids=[tid])
        if sampling.logprobs is not None:
            delta.logprobs = [_logprob(tid, sampling.logprobs)]
        if tid in sampling.stop_token_ids:
            return self._finish(c, delta, "stop", str(tid))
        text = c.text + c.held + ch
        hit = min(
            (s for s in sampling.stop if s in text), key=lambda s: text.index(s), default=None
        )
        if hit is not None:  # the stop string is not part of the answer
            c.held = ""
            delta.text = text[: text.index(hit)][len(c.text) :]
            c.text += delta.text
            return self._finish(c, delta, "stop", hit)
        # as vLLM does, hold back what may be the start of a stop string
        hold = max(
            (n for s in sampling.stop for n in range(1, len(s)) if text.endswith(s[:n])),
            default=0,
        )
        delta.text, c.held = text[len(c.text) : len(text) - hold], text[len(text) - hold :]
        c.text += delta.text
        if c.count >= limit:
            return self._finish(c, delta, "length")
        return delta

    @staticmethod
    def _finish(c: _Choice, delta: ChoiceDelta, reason: str, stop_reason: str = "") -> ChoiceDelta:
        delta.text += c.held  # held back for a stop string that never came
        c.text += c.held
        c.held = ""
        c.finish_reason = delta.finish_reason = reason
        c.stop_reason = delta.stop_reason = stop_reason
        return delta

    async def abort(self, request_id: str) -> None:
        stop = self._running.get(request_id)
        if stop is not None and not stop.is_set():
            stop.set()
            self.aborted.append(request_id)

    async def embed(self, *, request_id: str, prompt_token_ids: list[int]) -> list[float]:
        self.requests += 1
        if self.task != "embed":
            raise UnsupportedTaskError(
                f"this model serves {self.task}, not embeddings; deploy an embedding model"
            )
        if self.error is not None:
            raise self.error
        await asyncio.sleep(self.token_latency_s)
        self._prompt_tokens += len(prompt_token_ids)
        self._finished += 1
        values = [
            float(sum((tid * (j + 1)) % 101 for tid in prompt_token_ids) % 211 - 105)
            for j in range(self.embedding_dims)
        ]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]


def _aborted(c: _Choice) -> ChoiceDelta:
    c.finish_reason = "abort"
    return ChoiceDelta(index=c.index, finish_reason="abort")


def _logprob(tid: int, top: int) -> TokenLogprob:
    """The sampled token is the most likely one (greedy), with `top` alternatives at most."""
    alternatives = [TopToken(tid, token_text(tid), -0.25)]
    alternatives += [
        TopToken(tid + k, token_text(tid + k), -0.25 - k) for k in range(1, max(1, top))
    ]
    return TokenLogprob(tid, token_text(tid), -0.25, tuple(alternatives))
