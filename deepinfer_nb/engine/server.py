"""The gRPC face of one engine: `EngineService` (protos/engine_service.proto) over a backend.

Owns the request lifecycle in the shim: validation (then INVALID_ARGUMENT), serving state
(STARTING while the model loads, READY, DRAINING after Shutdown/SIGTERM), the table of in-flight
requests used by Cancel and draining, usage counted from engine token ids, and the one place
where exceptions become gRPC status codes (by status.py's table). A cancelled or disconnected
call closes the backend stream, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hmac
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from .._proto import engine_service_pb2 as pb
from .._proto import engine_service_pb2_grpc as pb_grpc
from ..errors import EngineError, EngineUnavailableError, InvalidRequestError, UnsupportedTaskError
from ..procenv import freeze_heap
from . import tool_calls, validation
from .backend import ChoiceDelta, EngineBackend, Histogram, ModelFacts
from .backends import check_supported
from .status import status_for
from .tool_calls import ToolCallReader, ToolRequest
from .validation import Sampling, Structured

log = logging.getLogger("deepinfer_nb.engine")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A checked request, ready for the engine."""

    rid: str
    ids: list[int]
    sampling: Sampling
    tools: ToolRequest | None = None


class BindError(OSError):
    """The shim's port could not be bound."""


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("request failed", exc_info=exc)
    message = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
    await context.abort(code, message)


def _unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Translate exceptions of a unary handler into gRPC status codes, once."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable: context.abort raises") from exc

    return wrapper


def _streaming(
    fn: Callable[..., AsyncGenerator[T, None]],
) -> Callable[..., AsyncGenerator[T, None]]:
    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[T, None]:
        try:
            async with contextlib.aclosing(fn(self, request, context)) as events:
                async for item in events:
                    yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


class EngineServicer(pb_grpc.EngineServiceServicer):
    def __init__(
        self, backend: EngineBackend, *, model_name: str, default_grace_s: float = 30.0
    ) -> None:
        self._backend = backend
        self._model = model_name
        self._default_grace_s = default_grace_s
        self._started = time.monotonic()
        self.status = pb.SERVING_STATUS_STARTING
        self.status_message = "loading the model"
        self._facts: ModelFacts | None = None
        self._active: collections.Counter[str] = collections.Counter()
        self._idle = asyncio.Event()
        self._idle.set()
        self.shutdown_requested = asyncio.Event()
        self.shutdown_grace_s = default_grace_s
        self.shutdown_reason = ""

    # ---- lifecycle (driven by serve()) -------------------------------------------------------

    def mark_ready(self) -> None:
        self._facts = self._backend.facts()
        self.status, self.status_message = pb.SERVING_STATUS_READY, "ready"

    def begin_shutdown(self, grace_s: float | None = None, *, reason: str = "Shutdown") -> int:
        """Refuse new requests from now on; returns how many are in flight."""
        if self.status != pb.SERVING_STATUS_DRAINING:
            self.status = pb.SERVING_STATUS_DRAINING
            self.shutdown_reason = reason
            self.shutdown_grace_s = self._default_grace_s if not grace_s else grace_s
            self.status_message = f"draining {self.inflight} request(s)"
            self.shutdown_requested.set()
        return self.inflight

    @property
    def inflight(self) -> int:
        return sum(self._active.values())

    async def drain(self, grace_s: float) -> None:
        """Wait for in-flight requests up to `grace_s`, then abort the rest."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        except asyncio.TimeoutError:
            log.warning("grace period over: aborting %d request(s)", self.inflight)
            for rid in list(self._active):
                await self._backend.abort(rid)
            await asyncio.wait_for(self._idle.wait(), timeout=10.0)

    # ---- health and introspection ------------------------------------------------------------

    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(
            status=self.status,
            model=self._model,
            message=self.status_message,
            uptime_s=self._uptime(),
        )

    @_unary
    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        f = self._ready_facts()
        return pb.ModelInfoResponse(
            model=self._model,
            model_path=f.model_path,
            max_model_len=f.max_model_len,
            dtype=f.dtype,
            architecture=f.architecture,
            vocab_size=f.vocab_size,
            task=f.task,
            tensor_parallel_size=f.tensor_parallel_size,
            device=f.device,
            engine_version=f.engine_version,
            tool_call_parser=f.tool_call_parser,
        )

    @_unary
    async def GetMetrics(
        self, request: pb.MetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MetricsResponse:
        self._ready_facts()
        s = self._backend.stats()
        return pb.MetricsResponse(
            running_requests=s.running,
            waiting_requests=s.waiting,
            kv_cache_usage=s.kv_cache_usage,
            prompt_tokens_total=s.prompt_tokens_total,
            generation_tokens_total=s.generation_tokens_total,
            generation_tokens_per_s=s.generation_tokens_per_s,
            prompt_tokens_per_s=s.prompt_tokens_per_s,
            requests_finished_total=s.requests_finished_total,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            uptime_s=self._uptime(),
            inflight_rpcs=self.inflight,
            time_to_first_token_s=_histogram(s.time_to_first_token),
            inter_token_latency_s=_histogram(s.inter_token_latency),
        )

    @_unary
    async def GetKVCacheStatus(
        self, request: pb.KVCacheStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.KVCacheStatusResponse:
        f = self._ready_facts()
        s = self._backend.stats()
        return pb.KVCacheStatusResponse(
            usage=s.kv_cache_usage,
            num_gpu_blocks=f.num_kv_blocks,
            block_size=f.block_size,
            capacity_tokens=f.num_kv_blocks * f.block_size,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate,
        )

    # ---- control -----------------------------------------------------------------------------

    @_unary
    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelResponse:
        found = self._active[request.request_id] > 0
        if found:
            await self._backend.abort(request.request_id)
        return pb.CancelResponse(found=found)

    @_unary
    async def Shutdown(
        self, request: pb.ShutdownRequest, context: grpc.aio.ServicerContext
    ) -> pb.ShutdownResponse:
        inflight = self.begin_shutdown(request.grace_period_s)
        return pb.ShutdownResponse(accepted=True, inflight=inflight)

    # ---- generation --------------------------------------------------------------------------

    @_unary
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        return await self._complete(self._prepare_generate(request))

    @_streaming
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        async with contextlib.aclosing(self._stream(self._prepare_generate(request))) as events:
            async for event in events:
                yield event

    @_unary
    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        return await self._complete(self._prepare_chat(request))

    @_streaming
    async def ChatStream(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        async with contextlib.aclosing(self._stream(self._prepare_chat(request))) as events:
            async for event in events:
                yield event

    @_unary
    async def CreateEmbedding(
        self, request: pb.EmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbeddingResponse:
        f = self._accepting()
        if f.task != "embed":
            raise UnsupportedTaskError(
                f"model {self._model!r} serves {f.task}, not embeddings: "
                "use an embedding deployment (e.g. all-minilm-l6-v2) for /v1/embeddings"
            )
        if request.input and request.input_ids:
            raise InvalidRequestError("give either input or input_ids, not both")
        inputs = [list(t.ids) for t in request.input_ids] or [
            self._backend.tokenize(text, add_special_tokens=True) for text in request.input
        ]
        if not inputs:
            raise InvalidRequestError("input must contain at least one string")
        for i, ids in enumerate(inputs):
            if not ids or len(ids) > f.max_model_len:
                raise InvalidRequestError(
                    f"input[{i}] has {len(ids)} tokens; allowed 1 to {f.max_model_len}"
                )
            if max(ids) >= f.vocab_size:
                raise InvalidRequestError(
                    f"input[{i}] contains token {max(ids)}, beyond the vocabulary "
                    f"({f.vocab_size} tokens)"
                )
        rid = request.request_id or uuid.uuid4().hex
        with self._tracked(rid):
            # all at once, as vLLM's server does: the engine batches them
            vectors = await asyncio.gather(
                *(
                    self._backend.embed(request_id=f"{rid}-{i}", prompt_token_ids=ids)
                    for i, ids in enumerate(inputs)
                )
            )
        data = [pb.Embedding(index=i, values=v) for i, v in enumerate(vectors)]
        prompt_tokens = sum(len(ids) for ids in inputs)
        usage = pb.Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
        return pb.EmbeddingResponse(request_id=rid, data=data, usage=usage, model=self._model)

    # ---- helpers -----------------------------------------------------------------------------

    def _ready_facts(self) -> ModelFacts:
        if self.status == pb.SERVING_STATUS_STARTING or self._facts is None:
            raise EngineUnavailableError("the engine is still loading its model; retry shortly")
        return self._facts

    def _accepting(self) -> ModelFacts:
        facts = self._ready_facts()
        if self.status == pb.SERVING_STATUS_DRAINING:
            raise EngineUnavailableError("the engine is shutting down and accepts no new requests")
        return facts

    def _sampling(self, params: pb.SamplingParams, *, tools: bool = False) -> Sampling:
        sampling = validation.sampling_from_proto(params)
        name = self._backend.name
        if name == "vllm":
            check_supported(sampling, backend="vllm", tools=tools)
        elif name == "llama.cpp":
            check_supported(sampling, backend="llama.cpp", tools=tools)
        return sampling

    def _generating(self, what: str) -> ModelFacts:
        facts = self._accepting()
        if facts.task != "generate":
            raise UnsupportedTaskError(
                f"model {self._model!r} serves {facts.task}, not {what}: "
                "use /v1/embeddings with it, or a generative deployment for text"
            )
        return facts

    def _prepare_generate(self, request: pb.GenerateRequest) -> Prepared:
        facts = self._generating("completions")
        sampling = self._sampling(request.sampling)
        if request.prompt and request.prompt_token_ids:
            raise InvalidRequestError("give either prompt or prompt_token_ids, not both")
        if request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
            if max(ids) >= facts.vocab_size:
                raise InvalidRequestError(
                    f"prompt_token_ids contains {max(ids)}, beyond the vocabulary "
                    f"({facts.vocab_size} tokens)"
                )
        else:
            ids = self._backend.tokenize(request.prompt, add_special_tokens=True)
        sampling = validation.fit_context(
            sampling, prompt_tokens=len(ids), max_model_len=facts.max_model_len
        )
        return Prepared(request.request_id or uuid.uuid4().hex, ids, sampling)

    def _prepare_chat(self, request: pb.ChatRequest) -> Prepared:
        facts = self._generating("chat completions")
        tools = tool_calls.tool_request_from_proto(request)
        sampling = self._sampling(request.sampling, tools=tools is not None)
        messages = validation.messages_from_proto(list(request.messages))
        if tools is not None:
            sampling = self._tool_sampling(tools, sampling, facts)
        text = self._backend.render_chat(
            messages,
            chat_template=request.chat_template,
            tools=tools.tools if tools is not None else None,
        )
        # The template already carries the special tokens, as in vLLM's own chat serving.
        ids = self._backend.tokenize(text, add_special_tokens=False)
        sampling = validation.fit_context(
            sampling, prompt_tokens=len(ids), max_model_len=facts.max_model_len
        )
        return Prepared(request.request_id or uuid.uuid4().hex, ids, sampling, tools)

    def _tool_sampling(self, tools: ToolRequest, sampling: Sampling, facts: ModelFacts) -> Sampling:
        """`required` and a named function force a call through structured outputs; `auto`
        needs the engine's tool parser to read calls back."""
        if tools.choice == "auto" and not facts.tool_call_parser:
            raise tool_calls.ToolParserMissingError(
                f"tool_choice auto needs a tool-call parser, and model {self._model!r} has none "
                "(vLLM knows no parser for its family): deploy it with tool_call_parser "
                "(--tool-call-parser NAME, e.g. hermes), or use tool_choice required or a "
                "named function, which work on any model"
            )
        schema = tools.schema()
        if schema is None:
            return sampling
        # the call's schema replaces response_format, as in vLLM's server
        return dataclasses.replace(
            sampling, structured=Structured(json_schema=schema), json_object=False
        )

    def _readers(self, prepared: Prepared) -> list[ToolCallReader | None]:
        tools = prepared.tools
        if tools is None or tools.choice == "none":
            return [None] * prepared.sampling.n
        return [
            ToolCallReader(
                tools, parser=self._backend.tool_parser() if tools.choice == "auto" else None
            )
            for _ in range(prepared.sampling.n)
        ]

    async def _deltas(self, prepared: Prepared) -> AsyncGenerator[list[ChoiceDelta], None]:
        rid, ids, sampling = prepared.rid, prepared.ids, prepared.sampling
        with self._tracked(rid):
            stream = self._backend.generate(request_id=rid, prompt_token_ids=ids, sampling=sampling)
            # Closing runs on normal end, on error and when gRPC cancels this handler (client
            # gone); closing the backend stream aborts the engine request.
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for deltas in stream:
                    yield deltas

    async def _stream(self, prepared: Prepared) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        rid, ids = prepared.rid, prepared.ids
        readers = self._readers(prepared)
        completion = 0
        async with contextlib.aclosing(self._deltas(prepared)) as stream:
            async for deltas in stream:
                completion += sum(len(d.token_ids) for d in deltas)
                choices = [_choice(d) for d in deltas]
                for c in choices:
                    _read_tools(c, prepared.tools, readers[c.index])
                yield pb.GenerateStreamResponse(request_id=rid, deltas=choices)
        yield pb.GenerateStreamResponse(
            request_id=rid, usage=_usage(len(ids), completion), finished=True
        )

    async def _complete(self, prepared: Prepared) -> pb.GenerateResponse:
        rid, ids, sampling = prepared.rid, prepared.ids, prepared.sampling
        readers = self._readers(prepared)
        start = time.perf_counter()
        ttft = 0.0
        choices = [pb.Choice(index=i) for i in range(sampling.n)]
        texts: list[list[str]] = [[] for _ in range(sampling.n)]
        async with contextlib.aclosing(self._deltas(prepared)) as stream:
            async for deltas in stream:
                for d in deltas:
                    if d.token_ids and not ttft:
                        ttft = time.perf_counter() - start
                    choice = choices[d.index]
                    texts[d.index].append(d.text)
                    choice.token_ids.extend(d.token_ids)
                    choice.logprobs.extend(_logprob(lp) for lp in d.logprobs)
                    if d.finish_reason:
                        choice.finish_reason = d.finish_reason
                        choice.stop_reason = d.stop_reason
        for choice, parts, reader in zip(choices, texts, readers, strict=True):
            choice.text = "".join(parts)
            if reader is not None:
                choice.text, calls = reader.final(choice.text)
                choice.tool_calls.extend(calls)
                choice.finish_reason = tool_calls.finish_reason(
                    prepared.tools, reader, choice.finish_reason
                )
        completion = sum(len(c.token_ids) for c in choices)
        return pb.GenerateResponse(
            request_id=rid,
            choices=choices,
            model=self._model,
            usage=_usage(len(ids), completion),
            ttft_s=ttft,
        )

    def _tracked(self, rid: str) -> _Tracked:
        return _Tracked(self, rid)

    def _enter(self, rid: str) -> None:
        self._active[rid] += 1
        self._idle.clear()

    def _leave(self, rid: str) -> None:
        self._active[rid] -= 1
        if self._active[rid] <= 0:
            del self._active[rid]
        if not self._active:
            self._idle.set()
        if self.status == pb.SERVING_STATUS_DRAINING:
            self.status_message = f"draining {self.inflight} request(s)"

    def _uptime(self) -> float:
        return time.monotonic() - self._started


class _Tracked:
    """Counts a request as in flight for Cancel and draining while the block runs."""

    def __init__(self, servicer: EngineServicer, rid: str) -> None:
        self._servicer, self._rid = servicer, rid

    def __enter__(self) -> None:
        self._servicer._enter(self._rid)

    def __exit__(self, *exc: object) -> None:
        self._servicer._leave(self._rid)


def _usage(prompt: int, completion: int) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _histogram(h: Histogram) -> pb.Histogram:
    return pb.Histogram(bounds=h.bounds, counts=h.counts, sum=h.sum)


def _choice(d: ChoiceDelta) -> pb.Choice:
    return pb.Choice(
        index=d.index,
        text=d.text,
        token_ids=d.token_ids,
        finish_reason=d.finish_reason,
        stop_reason=d.stop_reason,
        logprobs=[_logprob(lp) for lp in d.logprobs],
    )


def _read_tools(
    choice: pb.Choice, tools: ToolRequest | None, reader: ToolCallReader | None
) -> None:
    """Replace a streamed choice's text delta by its content and tool-call deltas."""
    if reader is None:
        return
    content, calls = reader.feed(choice.text, list(choice.token_ids))
    choice.text = content
    choice.tool_calls.extend(calls)
    if choice.finish_reason:
        choice.finish_reason = tool_calls.finish_reason(tools, reader, choice.finish_reason)


def _logprob(lp: Any) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        token=lp.token,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob) for t in lp.top],
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC needs metadata `authorization: Bearer <token>`, else UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        metadata = dict(details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        handler = await continuation(details)
        if hmac.compare_digest(given, self._expected) or handler is None:
            return handler
        message = (
            "missing engine token" if not given else "wrong engine token"
        ) + ": send metadata 'authorization: Bearer <token>'"

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        ser = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **ser)
        return grpc.unary_unary_rpc_method_handler(deny, **ser)


def build_server(
    servicer: EngineServicer, *, host: str, port: int, token: str = ""
) -> tuple[grpc.aio.Server, int]:
    """A started-later grpc.aio server bound to host:port (port 0 = pick one); returns the port."""
    interceptors = [AuthInterceptor(token)] if token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_EngineServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise BindError(f"cannot bind {host}:{port} (in use?)")
    return server, bound


async def serve(
    backend: EngineBackend,
    *,
    host: str,
    port: int,
    model_name: str,
    token: str = "",
    grace_period_s: float = 30.0,
    on_bound: Callable[[int], None] = lambda _port: None,
) -> int:
    """Bind, answer STARTING while the model loads, serve, drain on shutdown; the exit code.

    A stop (SIGTERM, SIGINT or Shutdown) while the model loads abandons the load: the backend
    ends its engine processes and this returns 0.
    """
    servicer = EngineServicer(backend, model_name=model_name, default_grace_s=grace_period_s)
    server, bound = build_server(servicer, host=host, port=port, token=token)
    # Before the load, not after it: a supervisor may stop an engine that is still loading.
    remove_handlers = _signal_shutdown(servicer)
    try:
        await server.start()
        on_bound(bound)
        if not await _load(servicer, backend):
            await server.stop(grace=None)
            return 0
        # before READY: the collection takes a moment, and no request should wait on it
        frozen = freeze_heap()
        servicer.mark_ready()
        log.info(
            "engine ready: %s on %s:%d (%d start-up objects frozen)",
            model_name,
            host,
            bound,
            frozen,
        )
        await servicer.shutdown_requested.wait()
        log.info(
            "%s: draining %d request(s), grace %.0fs",
            servicer.shutdown_reason,
            servicer.inflight,
            servicer.shutdown_grace_s,
        )
        await servicer.drain(servicer.shutdown_grace_s)
        await server.stop(grace=2.0)  # lets the Shutdown reply and last stream events go out
    except BaseException:
        await server.stop(grace=None)
        raise
    finally:
        try:
            await backend.shutdown()
        finally:
            remove_handlers()  # only now: a signal during the shutdown must not kill us
    return 0


async def _load(servicer: EngineServicer, backend: EngineBackend) -> bool:
    """Load the model; False when a stop came first (the load is then abandoned)."""
    load = asyncio.ensure_future(backend.start())
    stop = asyncio.ensure_future(servicer.shutdown_requested.wait())
    try:
        await asyncio.wait({load, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if load.done():
        load.result()  # the load's own failure, if any
        return True
    log.warning(
        "%s while the model was loading: abandoning the load and ending the engine processes",
        servicer.shutdown_reason,
    )
    await backend.abort_start()
    load.cancel()
    # The load fails once its engine core is gone; that failure is the one we asked for.
    await asyncio.gather(load, return_exceptions=True)
    log.warning("stopped before the model was loaded")
    return False


def _signal_shutdown(servicer: EngineServicer) -> Callable[[], None]:
    """SIGTERM and SIGINT drain like a Shutdown call with the default grace period."""
    import signal

    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, functools.partial(servicer.begin_shutdown, reason=sig.name))

    def remove() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)

    return remove
