"""`EngineClient`: the async client of one engine shim, used by the gateway and the workers.

One grpc.aio channel per client (cheap to create, closed by `close()` or `async with`). Typed
methods per RPC; streams are async generators, and closing one early (break, `aclose()`, task
cancellation) cancels the gRPC call, which makes the shim abort the engine request. A failed call
raises the `EngineError` subclass that `status.ERRORS` names for its status, with the shim's
message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc

from .._proto import engine_service_pb2 as pb
from .._proto import engine_service_pb2_grpc as pb_grpc
from ..errors import EngineError
from .status import error_for

__all__ = ["EngineClient", "error_from_rpc"]

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    # Engines restart on the same port: reconnect quickly instead of backing off for minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def error_from_rpc(exc: grpc.aio.AioRpcError, *, endpoint: str = "") -> EngineError:
    """The project exception for a failed call (an unreachable engine's names its endpoint)."""
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE and endpoint:
        details = f"{details} (engine {endpoint})"
    return error_for(code, details)


class EngineClient:
    def __init__(self, endpoint: str, *, token: str = "", timeout: float | None = None) -> None:
        """`endpoint` is "host:port"; `timeout` is the default deadline of generation calls."""
        self.endpoint = endpoint
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channel = grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.EngineServiceStub(self._channel)

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    # ---- unary ------------------------------------------------------------------------------

    async def health(self, *, timeout: float = 5.0) -> pb.HealthCheckResponse:
        return await self._unary(self._stub.HealthCheck, pb.HealthCheckRequest(), timeout)

    async def generate(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> pb.GenerateResponse:
        return await self._unary(self._stub.Generate, request, self._deadline(timeout))

    async def chat(
        self, request: pb.ChatRequest, *, timeout: float | None = None
    ) -> pb.GenerateResponse:
        return await self._unary(self._stub.Chat, request, self._deadline(timeout))

    async def embed(
        self, request: pb.EmbeddingRequest, *, timeout: float | None = None
    ) -> pb.EmbeddingResponse:
        return await self._unary(self._stub.CreateEmbedding, request, self._deadline(timeout))

    async def cancel(self, request_id: str) -> bool:
        reply = await self._unary(self._stub.Cancel, pb.CancelRequest(request_id=request_id), 10.0)
        return bool(reply.found)

    async def metrics(self) -> pb.MetricsResponse:
        return await self._unary(self._stub.GetMetrics, pb.MetricsRequest(), 10.0)

    async def kv_cache_status(self) -> pb.KVCacheStatusResponse:
        return await self._unary(self._stub.GetKVCacheStatus, pb.KVCacheStatusRequest(), 10.0)

    async def model_info(self) -> pb.ModelInfoResponse:
        return await self._unary(self._stub.GetModelInfo, pb.ModelInfoRequest(), 10.0)

    async def shutdown(self, *, grace_period_s: float = 0.0) -> pb.ShutdownResponse:
        """Ask the shim to drain (0 = its default grace period) and exit."""
        return await self._unary(
            self._stub.Shutdown, pb.ShutdownRequest(grace_period_s=grace_period_s), 10.0
        )

    # ---- streaming --------------------------------------------------------------------------

    def generate_stream(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self._stream(self._stub.GenerateStream, request, self._deadline(timeout))

    def chat_stream(
        self, request: pb.ChatRequest, *, timeout: float | None = None
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self._stream(self._stub.ChatStream, request, self._deadline(timeout))

    # ---- plumbing ---------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, endpoint=self.endpoint) from None

    async def _stream(self, method: Any, request: Any, timeout: float | None) -> AsyncIterator[Any]:
        call = method(request, timeout=timeout, metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, endpoint=self.endpoint) from None
        finally:
            # No-op when the call already finished; otherwise the shim sees CANCELLED and
            # aborts the engine request.
            call.cancel()
