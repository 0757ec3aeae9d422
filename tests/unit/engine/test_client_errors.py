"""gRPC status codes map onto the project's exception tree, once, in the client."""

from __future__ import annotations

import grpc
import pytest

from deepinfer_nb.engine.client import EngineClient, error_from_rpc
from deepinfer_nb.errors import (
    AuthenticationError,
    EngineError,
    EngineTimeoutError,
    EngineUnavailableError,
    InvalidRequestError,
    RequestCancelledError,
)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError),
        (grpc.StatusCode.UNAVAILABLE, EngineUnavailableError),
        (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, EngineTimeoutError),
        (grpc.StatusCode.CANCELLED, RequestCancelledError),
        (grpc.StatusCode.FAILED_PRECONDITION, InvalidRequestError),
        (grpc.StatusCode.INTERNAL, EngineError),
    ],
)
def test_status_codes_map_to_errors(code: grpc.StatusCode, cls: type[EngineError]) -> None:
    err = error_from_rpc(rpc_error(code, "the shim says why"))
    assert type(err) is cls
    assert "the shim says why" in str(err)
    assert err.grpc_code == code.name  # type: ignore[attr-defined]


async def test_unreachable_engine_is_unavailable() -> None:
    async with EngineClient("127.0.0.1:1") as client:
        with pytest.raises(EngineUnavailableError, match=r"127\.0\.0\.1:1"):
            await client.health(timeout=2.0)
