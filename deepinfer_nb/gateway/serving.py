"""The serving layer behind the OpenAI routes: pick a replica, call it, stream the answer.

Per request: resolve the model in the routing table, hold the least-loaded Running replica
(a `Lease`; while none runs but one is on its way, the request waits for it: hold.py), call its
engine over the pooled gRPC channel, and translate the reply. A call that fails before its first
byte with a temporary error (`errors.is_temporary`: engine unreachable, draining, or failing) is
retried once on another replica; one whose engine was unreachable and has no other replica waits
for the engine's restart like a new request. A client-caused error is never retried. Streams
are opened before the HTTP response starts, so such failures still get a proper status; after
that, an engine failure ends the stream with an OpenAI error event. A client that disconnects
cancels the engine call (the shim then aborts the vLLM request), or its wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from .. import errors as E
from .._proto import engine_service_pb2 as pb
from ..engine import local_models
from ..engine.client import EngineClient
from ..models import DeploymentSpec
from . import translate
from .activity import ActivityReporter
from .errors import APIError, ClientDisconnected, invalid, to_api_error
from .hold import HOLD_CODES, HoldQueue
from .metrics import GatewayMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .routing import Lease, RoutingTable

T = TypeVar("T")
Stream = AsyncIterator[pb.GenerateStreamResponse]

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_TASK_WORDS = {"generate": "text generation (chat, completions)", "embed": "embeddings"}


class _Tracker:
    """Metrics of one request: status, latency, time to first token, tokens."""

    __slots__ = ("endpoint", "metrics", "model", "start")

    def __init__(self, metrics: GatewayMetrics, *, model: str, endpoint: str) -> None:
        self.metrics = metrics
        self.model = model
        self.endpoint = endpoint
        self.start = time.perf_counter()

    def first_token(self) -> None:
        self.metrics.first_token(model=self.model, seconds=time.perf_counter() - self.start)

    def tokens(self, u: pb.Usage) -> None:
        self.metrics.tokens(
            model=self.model, prompt=u.prompt_tokens, completion=u.completion_tokens
        )

    def done(self, status: int = 200, error_type: str = "") -> None:
        self.metrics.finished(
            model=self.model,
            endpoint=self.endpoint,
            status=status,
            seconds=time.perf_counter() - self.start,
            error_type=error_type,
        )

    def failed(self, exc: BaseException) -> None:
        err = to_api_error(ClientDisconnected() if isinstance(exc, asyncio.CancelledError) else exc)
        self.done(err.status, err.type)


class SSEResponse(StreamingResponse):
    """A streaming response whose cleanup runs however the response ends (even if the client
    is gone before the body iterator was ever started)."""

    def __init__(self, body: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


class OpenAIServing:
    def __init__(
        self,
        table: RoutingTable,
        metrics: GatewayMetrics,
        *,
        hold: HoldQueue | None = None,
        activity: ActivityReporter | None = None,
    ) -> None:
        self.table = table
        self.metrics = metrics
        self.hold = hold or HoldQueue(table, None)
        self.activity = activity
        # tasks the engines reported, for deployments whose spec and model do not say
        self._tasks: dict[tuple[str, float], str] = {}

    # ---- what a deployment serves -------------------------------------------------------------

    def known_task(self, spec: DeploymentSpec) -> str | None:
        """generate | embed from the spec's `task`, the local model catalog, or what an engine
        of the deployment reported; None while none of them says."""
        if spec.task != "auto":
            return spec.task
        local = local_models.lookup(spec.model)
        if local is not None:
            return local.task
        return self._tasks.get((spec.name, spec.created_at))

    async def task(self, spec: DeploymentSpec) -> str | None:
        """`known_task`, asking a Running engine when nothing else says."""
        known = self.known_task(spec)
        if known is not None:
            return known
        try:
            lease = self.table.acquire(spec)
        except APIError:
            return None
        try:
            info = await lease.client.model_info()
        except E.EngineError:
            return None
        finally:
            lease.release()
        self._tasks[(spec.name, spec.created_at)] = info.task
        return info.task or None

    def _require_task(self, spec: DeploymentSpec, task: str, what: str) -> None:
        served = self.known_task(spec)
        if served is None or served == task:
            return  # unknown: the engine checks (FAILED_PRECONDITION, mapped to a 400)
        use = "/v1/embeddings" if served == "embed" else "/v1/chat/completions or /v1/completions"
        raise invalid(
            f"deployment {spec.name!r} (model {spec.model_name!r}) serves "
            f"{_TASK_WORDS[served]}, not {what}: use {use} with it, or a deployment that serves "
            f"{_TASK_WORDS[task]}",
            param="model",
        )

    # ---- endpoints ------------------------------------------------------------------------------

    def _resolve(self, model: str) -> DeploymentSpec:
        spec = self.table.resolve(model)
        if self.activity is not None:
            self.activity.note(spec.name)
        return spec

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        spec = self._resolve(body.model)
        self._require_task(spec, "generate", "chat completions")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        preq = translate.chat_request(body, rid)
        track = _Tracker(self.metrics, model=spec.model_name, endpoint="chat")
        if body.stream:
            chunks = translate.ChatChunks(
                id=rid,
                model=body.model,
                n=body.n,
                logprobs=body.logprobs,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
            )
            return await self._stream(spec, lambda c: c.chat_stream(preq), chunks, track, request)
        resp = await self._tracked(track, request, self._call(spec, lambda c: c.chat(preq)))
        track.tokens(resp.usage)
        track.done()
        out = translate.chat_response(resp, id=rid, model=body.model, logprobs=body.logprobs)
        return _json(out)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        spec = self._resolve(body.model)
        self._require_task(spec, "generate", "completions")
        rid = f"cmpl-{uuid.uuid4().hex}"
        preqs = translate.completion_requests(body, rid)
        track = _Tracker(self.metrics, model=spec.model_name, endpoint="completions")
        logprobs = body.logprobs is not None
        if body.stream:
            chunks = translate.CompletionChunks(
                id=rid,
                model=body.model,
                n=body.n,
                logprobs=logprobs,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
            )
            preq = preqs[0]
            return await self._stream(
                spec, lambda c: c.generate_stream(preq), chunks, track, request
            )
        calls = [self._call(spec, _generate(p)) for p in preqs]
        replies = await self._tracked(track, request, _gather(calls))
        for r in replies:
            track.tokens(r.usage)
        track.done()
        out = translate.completion_response(
            replies, id=rid, model=body.model, n=body.n, logprobs=logprobs
        )
        return _json(out)

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        spec = self._resolve(body.model)
        self._require_task(spec, "embed", "embeddings")
        preq = translate.embedding_request(body, f"embd-{uuid.uuid4().hex}")
        track = _Tracker(self.metrics, model=spec.model_name, endpoint="embeddings")
        resp = await self._tracked(track, request, self._call(spec, lambda c: c.embed(preq)))
        track.tokens(resp.usage)
        track.done()
        out = translate.embedding_json(
            resp, model=body.model, base64_out=body.encoding_format == "base64"
        )
        return Response(out, media_type="application/json")

    # ---- calling replicas -----------------------------------------------------------------------

    async def _lease(
        self, spec: DeploymentSpec, tried: dict[str, object], error: BaseException | None
    ) -> Lease:
        """A replica for the first try (waiting while one is on its way), or for the one retry
        after `error`: another replica at once; else, when the engine was unreachable, its next
        run (or another replica), waited for like a new request."""
        if error is None:
            return await self.hold.lease(spec)
        try:
            return self.table.acquire(spec, exclude=tuple(tried))
        except APIError:
            if not isinstance(error, E.EngineUnavailableError):
                raise error from None  # nowhere to retry: the client sees the engine's failure
        try:
            return await self.hold.lease(spec, tried=tried)
        except APIError as exc:
            if exc.code in HOLD_CODES:
                raise
            raise error from None  # nothing on its way: the engine's failure says why

    def _tried(self, tried: dict[str, object], lease: Lease) -> None:
        tried[lease.engine_id] = self.table.incarnation(lease.engine_id)

    async def _call(self, spec: DeploymentSpec, call: Callable[[EngineClient], Awaitable[T]]) -> T:
        tried: dict[str, object] = {}
        error: BaseException | None = None
        while True:
            lease = await self._lease(spec, tried, error)
            try:
                return await call(lease.client)
            except E.EngineError as exc:
                if error is not None or not E.is_temporary(exc):
                    raise
                error = exc
                self._tried(tried, lease)
            finally:
                lease.release()

    async def _open(
        self, spec: DeploymentSpec, open_stream: Callable[[EngineClient], Stream]
    ) -> tuple[Lease, Stream, pb.GenerateStreamResponse | None]:
        """Start a stream and read its first event, retrying once on another replica."""
        tried: dict[str, object] = {}
        error: BaseException | None = None
        while True:
            lease = await self._lease(spec, tried, error)
            stream = open_stream(lease.client)
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                return lease, stream, None
            except BaseException as exc:
                lease.release()
                await _aclose(stream)
                if error is not None or not E.is_temporary(exc):
                    raise
                error = exc
                self._tried(tried, lease)
                continue
            return lease, stream, first

    async def _stream(
        self,
        spec: DeploymentSpec,
        open_stream: Callable[[EngineClient], Stream],
        chunks: translate._Chunks,
        track: _Tracker,
        request: Request,
    ) -> Response:
        lease, stream, first = await self._tracked(track, request, self._open(spec, open_stream))
        if first is not None:
            track.first_token()
        # how the stream ended, for the metrics (499 until it ends by itself)
        outcome: list[Any] = [499, "client_disconnected"]

        async def body() -> AsyncIterator[str]:
            for piece in chunks.start():
                yield piece
            try:
                if first is not None:
                    for piece in self._on_event(first, chunks, track):
                        yield piece
                async for event in stream:
                    for piece in self._on_event(event, chunks, track):
                        yield piece
            except E.DeepInferError as exc:
                # headers are gone: report in-band, as OpenAI does, and end the stream
                err = to_api_error(exc)
                outcome[:] = [err.status, err.type]
                yield translate.sse(err.body().model_dump())
                yield translate.DONE
                return
            for piece in chunks.end():
                yield piece
            outcome[:] = [200, ""]

        async def cleanup() -> None:
            lease.release()
            await _aclose(stream)
            track.done(outcome[0], outcome[1])

        return SSEResponse(body(), cleanup)

    def _on_event(
        self, event: pb.GenerateStreamResponse, chunks: translate._Chunks, track: _Tracker
    ) -> list[str]:
        if event.finished and event.HasField("usage"):
            track.tokens(event.usage)
        return chunks.event(event)

    async def _tracked(self, track: _Tracker, request: Request, work: Awaitable[T]) -> T:
        """Run `work` until done or until the client disconnects (then cancel it); count
        failures in the metrics."""
        try:
            return await _until_disconnect(request, work)
        except BaseException as exc:
            track.failed(exc)
            raise


def _json(body: BaseModel) -> Response:
    """A JSON response serialised by pydantic-core straight to bytes (no dict in between)."""
    return Response(body.model_dump_json(), media_type="application/json")


def _generate(preq: pb.GenerateRequest) -> Callable[[EngineClient], Awaitable[pb.GenerateResponse]]:
    return lambda client: client.generate(preq)


async def _gather(calls: Sequence[Awaitable[T]]) -> list[T]:
    if len(calls) == 1:  # the usual case: no task to create
        return [await calls[0]]
    return list(await asyncio.gather(*calls))


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    watcher: asyncio.Future[Any] = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            # cancelling the gRPC call makes the shim abort the vLLM request
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        watcher.cancel()
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnected(request: Request) -> None:
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
