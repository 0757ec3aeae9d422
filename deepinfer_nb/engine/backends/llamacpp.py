"""`EngineBackend` over llama-cpp-python (`llama_cpp.Llama`): GGUF models on CPU (or CUDA builds).

A `Llama` holds one context and is not thread-safe, and its Python API decodes one sequence at a
time, so one worker thread owns it and serves requests from a FIFO queue (fair: arrival order;
`n` choices of a request run one after another). The queue's length is the `waiting` gauge and
the sequence in the context is `running`. The thread checks a request's cancel flag before
every token, so Cancel, a closed stream and draining stop generation at the next token.

Facts this relies on (llama-cpp-python 0.3.36, llama_cpp/llama.py): `Llama.generate()` yields
token ids, builds its sampler (penalties, grammar, top-k/top-p/min-p, temperature, seeded dist)
from `Llama._seed` and reuses the longest cached prompt prefix of the previous request; after
each yield the context still holds the logits of the step that produced the token
(`llama_get_logits_ith(ctx, -1)`), which gives logprobs without `logits_all`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ...errors import EngineError, InvalidRequestError, UnsupportedTaskError
from ..backend import (
    ChoiceDelta,
    EngineBackend,
    EngineStats,
    ModelFacts,
    TokenLogprob,
    TopToken,
    settle_from_thread,
)
from ..gguf_header import DEFAULT_MAX_CTX, default_n_ctx
from ..stats import StatsAccumulator
from ..validation import Sampling
from .stops import StopMatcher

ENCODER_ARCHITECTURES = frozenset({"bert", "nomic-bert", "jina-bert-v2", "modern-bert"})
"""GGUF `general.architecture`s that are embedding models (loaded with `embedding=True`)."""
N_BATCH = 512


@dataclasses.dataclass(frozen=True)
class LlamaCppSettings:
    model_path: str
    n_ctx: int = 0  # 0: gguf_header.default_n_ctx (the model's own, capped)
    threads: int = 1
    n_gpu_layers: int = 0  # -1: all layers on the GPU (CUDA builds)
    flash_attn: bool = False


@dataclasses.dataclass
class _Job:
    rid: str
    prompt: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[ChoiceDelta | BaseException | None]
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    arrived: float = dataclasses.field(default_factory=time.monotonic)

    def emit(self, item: ChoiceDelta | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the process is exiting
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class LlamaCppBackend(EngineBackend):
    name = "llama.cpp"

    def __init__(self, settings: LlamaCppSettings) -> None:
        self._settings = settings
        self._llm: Any = None
        self._embedding = False
        self._stats = StatsAccumulator()
        self._queue: queue.Queue[_Job | _Embedding | None] = queue.Queue()
        self._jobs: dict[str, _Job] = {}
        self._running = 0
        self._worker: threading.Thread | None = None
        self._loaded = threading.Event()
        self._template: Any = None
        self._version = ""

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def load() -> None:
            try:
                self._load()
            except BaseException as exc:
                settle_from_thread(loop, done, exc=exc)
            else:
                settle_from_thread(loop, done)
            finally:
                self._loaded.set()

        # A daemon thread: loading a large GGUF takes seconds and must not block health checks.
        threading.Thread(target=load, name="llamacpp-load", daemon=True).start()
        await asyncio.shield(done)
        self._worker = threading.Thread(target=self._serve, name="llamacpp-worker", daemon=True)
        self._worker.start()

    def _load(self) -> None:
        import llama_cpp

        s = self._settings
        if not Path(s.model_path).is_file():
            raise EngineError(f"model not found: {s.model_path} (no such GGUF file)")
        common: dict[str, Any] = dict(
            model_path=s.model_path,
            n_threads=s.threads,
            n_threads_batch=s.threads,
            n_gpu_layers=s.n_gpu_layers,
            n_batch=N_BATCH,
            flash_attn=s.flash_attn,
            verbose=False,
        )
        try:
            llm = llama_cpp.Llama(n_ctx=s.n_ctx or DEFAULT_MAX_CTX, **common)
            arch = llm.metadata.get("general.architecture", "")
            n_ctx = s.n_ctx or default_n_ctx(llm._model.n_ctx_train())
            if arch in ENCODER_ARCHITECTURES or n_ctx != llm.n_ctx():
                llm.close()
                self._embedding = arch in ENCODER_ARCHITECTURES
                llm = llama_cpp.Llama(n_ctx=n_ctx, embedding=self._embedding, **common)
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            raise EngineError(
                f"llama.cpp cannot load {s.model_path}: {exc} (is it a GGUF file of an "
                "architecture this llama.cpp build knows?)"
            ) from None
        self._llm = llm
        self._version = str(llama_cpp.__version__)
        if not self._embedding:
            self._template = _chat_formatter(llm)

    async def abort_start(self) -> None:
        # The load runs in this process and cannot be interrupted; it takes about a second for
        # small models, so wait for it and let shutdown() free what it loaded.
        await asyncio.to_thread(self._loaded.wait, 60.0)

    async def shutdown(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel.set()
        if self._worker is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._worker.join, 30.0)
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    # ---- model facts --------------------------------------------------------------------------

    def facts(self) -> ModelFacts:
        llm = self._llm
        meta = llm.metadata
        on_gpu = self._settings.n_gpu_layers != 0 and _gpu_build()
        return ModelFacts(
            model_path=self._settings.model_path,
            max_model_len=int(llm.n_ctx()),
            dtype=_file_type(meta),
            architecture=meta.get("general.architecture", ""),
            vocab_size=int(llm.n_vocab()),
            task="embed" if self._embedding else "generate",
            tensor_parallel_size=1,
            device="cuda" if on_gpu else "cpu",
            engine_version=f"llama-cpp-python {self._version}",
            num_kv_blocks=int(llm.n_ctx()),  # one sequence: the KV cache holds n_ctx tokens
            block_size=1,
        )

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        chat_template: str = "",
        tools: list[dict[str, Any]] | None = None,  # never set: CAPABILITIES refuses tools
    ) -> str:
        formatter = self._template
        if chat_template:
            formatter = _chat_formatter(self._llm, template=chat_template)
        if formatter is None:
            raise InvalidRequestError(
                "this GGUF carries no chat template (tokenizer.chat_template): send a raw "
                "prompt (completions) or pass chat_template"
            )
        try:
            return str(formatter(messages=messages).prompt)
        except Exception as exc:  # jinja errors: the template rejected these messages
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from None

    def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        # special=True: chat templates and raw prompts spell special tokens (<|im_start|>) as
        # text, which HF tokenizers (and so vLLM) parse as the special tokens too.
        return list(self._llm.tokenize(text.encode(), add_bos=add_special_tokens, special=True))

    # ---- requests -----------------------------------------------------------------------------

    async def generate(
        self, *, request_id: str, prompt_token_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[list[ChoiceDelta]]:
        if self._embedding:
            raise UnsupportedTaskError(
                "this model serves embeddings, not generation; deploy a chat or text model"
            )
        job = _Job(request_id, prompt_token_ids, sampling, asyncio.get_running_loop(), _queue())
        self._jobs[request_id] = job
        self._queue.put(job)
        self._gauges()
        try:
            while True:
                item = await job.out.get()
                items = [item]
                while not job.out.empty():  # everything decoded meanwhile, as one event
                    items.append(job.out.get_nowait())
                deltas, finished = _merge(items)
                if deltas:
                    yield deltas
                if finished:
                    return
        finally:
            job.cancel.set()  # closed early (client gone, error): stop at the next token
            self._jobs.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        job = self._jobs.get(request_id)
        if job is not None:
            job.cancel.set()

    async def embed(self, *, request_id: str, prompt_token_ids: list[int]) -> list[float]:
        if not self._embedding:
            raise UnsupportedTaskError(
                "this model serves generate, not embeddings; deploy an embedding GGUF (a BERT "
                "family model) with llama.cpp, or an embedding model with vLLM"
            )
        # Embeddings share the worker thread's context: run them as queued jobs would, in order.
        loop = asyncio.get_running_loop()
        result: asyncio.Future[list[float]] = loop.create_future()

        def run() -> None:
            try:
                values = self._llm.embed(self._llm.detokenize(prompt_token_ids).decode())
            except BaseException as exc:
                settle_from_thread(loop, result, exc=exc)
            else:
                settle_from_thread(loop, result, [float(x) for x in values])

        self._queue.put(_Embedding(run))
        return await result

    def stats(self) -> EngineStats:
        return self._stats.snapshot()

    # ---- the worker thread --------------------------------------------------------------------

    def _gauges(self, n_tokens: int = 0) -> None:
        self._stats.record_scheduler(
            running=self._running,
            waiting=self._queue.qsize(),
            kv_cache_usage=n_tokens / max(1, self._llm.n_ctx()) if self._llm else 0.0,
        )

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if isinstance(job, _Embedding):
                job.run()
                continue
            self._running = 1
            self._gauges()
            try:
                self._run(job)
            except BaseException as exc:
                job.emit(InvalidRequestError(str(exc)) if isinstance(exc, ValueError) else exc)
            finally:
                self._running = 0
                self._gauges()
                job.emit(None)

    def _run(self, job: _Job) -> None:
        s = job.sampling
        self._stats.record_iteration(prompt_tokens=len(job.prompt), generation_tokens=0, finished=0)
        for index in range(s.n):
            if job.cancel.is_set():
                job.emit(ChoiceDelta(index=index, finish_reason="abort"))
                continue
            seed = random.getrandbits(31) if s.seed is None else (s.seed + index) % 2**31
            _Choice(
                self._llm, job, index=index, seed=seed, stats=self._stats, on_token=self._gauges
            ).run()
        self._stats.record_iteration(prompt_tokens=0, generation_tokens=0, finished=1)


@dataclasses.dataclass(frozen=True)
class _Embedding:
    """A queued embedding call (runs on the worker thread, between generation jobs)."""

    run: Callable[[], None]


class _Choice:
    """One choice of one request, generated on the worker thread."""

    def __init__(
        self,
        llm: Any,
        job: _Job,
        *,
        index: int,
        seed: int,
        stats: StatsAccumulator,
        on_token: Callable[[int], None],
    ) -> None:
        self.llm, self.job, self.index, self.stats = llm, job, index, stats
        self.on_token = on_token  # gets the context's token count (the KV cache gauge)
        self.seed = seed
        self.stops = StopMatcher(job.sampling.stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def run(self) -> None:
        import llama_cpp

        s, llm, job = self.job.sampling, self.llm, self.job
        llm.set_seed(self.seed)
        vocab = llm._model.vocab
        tokens = llm.generate(
            job.prompt,
            temp=s.temperature,
            top_k=s.top_k if s.top_k > 0 else 0,
            top_p=s.top_p,
            min_p=0.0,  # off, as in vLLM and OpenAI's API (llama-cpp-python defaults to 0.05)
            typical_p=1.0,
            repeat_penalty=1.0,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            grammar=_json_grammar() if s.json_object else None,
        )
        generated = 0
        stop_ids = set(s.stop_token_ids)
        last = job.arrived
        try:
            for token in tokens:
                if job.cancel.is_set():
                    self._send(finish="abort", text=self.stops.flush())
                    return
                generated += 1
                now = time.monotonic()
                self.stats.record_iteration(prompt_tokens=0, generation_tokens=1, finished=0)
                self._latency(now - last, first=generated == 1)
                last = now
                self.on_token(llm.n_tokens)
                logprobs = self._logprobs(token, s.logprobs) if s.logprobs is not None else []
                if llama_cpp.llama_vocab_is_eog(vocab, token) and not s.ignore_eos:
                    self._send(token, logprobs, finish="stop", text=self.stops.flush())
                    return
                if token in stop_ids:
                    self._send(
                        token, logprobs, finish="stop", reason=str(token), text=self.stops.flush()
                    )
                    return
                piece = self.decoder.decode(llm.detokenize([token]))
                text, hit = self.stops.feed(piece)
                if hit:
                    self._send(token, logprobs, finish="stop", reason=hit, text=text)
                    return
                if generated >= (s.max_tokens or 0):
                    self._send(token, logprobs, finish="length", text=text + self.stops.flush())
                    return
                self._send(token, logprobs, text=text)
        finally:
            tokens.close()

    def _latency(self, seconds: float, *, first: bool) -> None:
        # Choices run one after another: only the first one's first token measures the request's
        # wait; a later choice's first token would count the earlier choices' whole generation.
        if not first:
            self.stats.record_latencies(inter_token=(seconds,))
        elif self.index == 0:
            self.stats.record_latencies(first_token=(seconds,))

    def _send(
        self,
        token: int | None = None,
        logprobs: list[TokenLogprob] | None = None,
        *,
        text: str = "",
        finish: str = "",
        reason: str = "",
    ) -> None:
        self.job.emit(
            ChoiceDelta(
                index=self.index,
                text=text,
                token_ids=[] if token is None else [token],
                logprobs=logprobs or [],
                finish_reason=finish,
                stop_reason=reason,
            )
        )

    def _logprobs(self, token: int, top_n: int) -> list[TokenLogprob]:
        import llama_cpp
        import numpy as np

        llm = self.llm
        n_vocab = llm.n_vocab()
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        top_ids = [int(t) for t in np.argsort(-logprobs)[:top_n]] if top_n else []
        top = tuple(TopToken(t, _piece(llm, t), float(logprobs[t])) for t in top_ids)
        return [TokenLogprob(token, _piece(llm, token), float(logprobs[token]), top)]


def _piece(llm: Any, token: int) -> str:
    return bytes(llm.detokenize([token], special=True)).decode(errors="replace")


def _merge(items: list[Any]) -> tuple[list[ChoiceDelta], bool]:
    """Per choice, one delta from the token deltas that arrived together; raises a worker error;
    True once the request is over (the worker's None)."""
    merged: dict[int, ChoiceDelta] = {}
    finished = False
    for item in items:
        if isinstance(item, BaseException):
            raise item
        if item is None:
            finished = True
            continue
        d = merged.get(item.index)
        if d is None:
            merged[item.index] = dataclasses.replace(
                item, token_ids=list(item.token_ids), logprobs=list(item.logprobs)
            )
            continue
        d.text += item.text
        d.token_ids += item.token_ids
        d.logprobs += item.logprobs
        d.finish_reason = item.finish_reason or d.finish_reason
        d.stop_reason = item.stop_reason or d.stop_reason
    return list(merged.values()), finished


def _queue() -> asyncio.Queue[ChoiceDelta | BaseException | None]:
    return asyncio.Queue()


def _chat_formatter(llm: Any, *, template: str = "") -> Any:
    """A renderer for the GGUF's own chat template (or `template`), None if it has none."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = template or llm.metadata.get("tokenizer.chat_template", "")
    if not template:
        return None
    return Jinja2ChatFormatter(
        template=template,
        eos_token=_piece(llm, llm.token_eos()),
        bos_token=_piece(llm, llm.token_bos()),
        add_generation_prompt=True,
    )


_GRAMMAR: Any = None


def _json_grammar() -> Any:
    """llama.cpp's GBNF grammar for any JSON value, parsed once (json_object)."""
    global _GRAMMAR
    if _GRAMMAR is None:
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        _GRAMMAR = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    return _GRAMMAR


def _gpu_build() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1",
              10: "q2_k", 11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m",
              16: "q5_k_s", 17: "q5_k_m", 18: "q6_k", 32: "bf16"}  # fmt: skip
"""GGUF `general.file_type` values (llama.h's LLAMA_FTYPE_MOSTLY_*) as names."""


def _file_type(meta: dict[str, str]) -> str:
    raw = meta.get("general.file_type", "")
    return FILE_TYPES.get(int(raw), f"gguf-ftype-{raw}") if raw.isdigit() else "gguf"
