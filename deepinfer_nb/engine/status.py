"""The gRPC boundary's one table: status code <-> exception, for the shim and its client alike.

The shim answers a raised exception with `status_for(exc)`; the client turns a failed call back
into an exception with `error_for(code, message)`. Both read `ERRORS`, so what one side sends the
other decodes to the same class (several codes may decode to one class; its first code is the one
the shim sends). Codes not in the table are engine faults: `EngineError`, INTERNAL.
"""

from __future__ import annotations

import grpc

from ..errors import (
    AuthenticationError,
    EngineError,
    EngineTimeoutError,
    EngineUnavailableError,
    InvalidRequestError,
    NotFoundError,
    RequestCancelledError,
    UnsupportedFeatureError,
    UnsupportedTaskError,
)

__all__ = ["ERRORS", "error_for", "status_for"]

ERRORS: dict[grpc.StatusCode, type[EngineError]] = {
    # client-caused: permanent, never retried
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: UnsupportedTaskError,
    grpc.StatusCode.UNIMPLEMENTED: UnsupportedFeatureError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    # engine-side: temporary
    grpc.StatusCode.UNAVAILABLE: EngineUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: EngineTimeoutError,
    grpc.StatusCode.INTERNAL: EngineError,
}

_STATUS: dict[type[EngineError], grpc.StatusCode] = {}
for _code, _cls in ERRORS.items():
    _STATUS.setdefault(_cls, _code)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status the shim answers `exc` with: that of its nearest class in the table."""
    for cls in type(exc).__mro__:
        code = _STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def error_for(code: grpc.StatusCode, message: str) -> EngineError:
    """The exception a client raises for a call that ended with `code`."""
    return ERRORS.get(code, EngineError)(message)
