"""The gateway's one error boundary: every exception becomes an OpenAI `ErrorResponse`.

`APIError` is what routers and the serving layer raise on purpose; `to_api_error` maps the
package's exception tree (`deepinfer_nb.errors`) onto it by one table (`_HTTP`), and
`install_handlers` registers that mapping on the app so no router formats an error itself.

    status  type                     when
    400     invalid_request_error    bad parameters (OpenAI routes), engine rejected arguments,
                                     the model serves another task, the engine lacks the call
    401     authentication_error     missing or wrong API key
    403     permission_error         the API key lacks the route's scope (inference vs admin)
    404     invalid_request_error    unknown model / deployment / route / engine resource
    409     invalid_request_error    deployment exists with another spec
    413     invalid_request_error    request body over the size cap
    499     client_disconnected      (metrics only: the client left before the answer)
    422     invalid_request_error    invalid deployment spec (names the field), or one the
                                     launch policy refuses (code launch_policy, names the rule)
    500     server_error             a corrupt record in the store, a bug
    502     engine_error             the engine failed, could not be reached, refused our token
    503     service_unavailable      no Running replica (says why), store unreachable; with
                                     Retry-After when requests waited for a starting replica
                                     past [server] hold_timeout_s, or too many already wait
    504     timeout_error            the engine did not answer in time
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import errors as E
from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info)

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.body().model_dump(), status_code=self.status, headers=self.headers or None
        )


class ClientDisconnected(APIError):
    """The HTTP client went away before its answer was ready (nobody reads this status)."""

    def __init__(self) -> None:
        super().__init__(499, "client disconnected", type="client_disconnected")


def invalid(message: str, *, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_parameter")


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model '{model}' does not exist", param="model", code="model_not_found"
    )


def no_replica(reason: str) -> APIError:
    return APIError(503, reason, type="service_unavailable", code="no_running_replica")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def forbidden(message: str) -> APIError:
    return APIError(403, message, type="permission_error", code="insufficient_scope")


def validation_error(exc: ValidationError | RequestValidationError, *, status: int) -> APIError:
    """The first error of a pydantic validation, naming the field at fault."""
    first: Any = exc.errors()[0]
    # FastAPI prefixes body fields with "body"; the client knows them by their own name
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return APIError(status, message, param=param, code="validation_error")


@dataclasses.dataclass(frozen=True)
class _Row:
    status: int
    type: str
    code: str
    prefix: str = ""


# The HTTP boundary's one table: the nearest class of an exception (by its MRO) decides what the
# client sees. Client-caused errors are 4xx; an engine fault is the gateway's 502 (its engine
# token included: the HTTP client's own key is checked before any engine is called).
_HTTP: dict[type[BaseException], _Row] = {
    E.InvalidRequestError: _Row(400, "invalid_request_error", "invalid_parameter"),
    E.UnsupportedTaskError: _Row(400, "invalid_request_error", "unsupported_task"),
    E.UnsupportedFeatureError: _Row(400, "invalid_request_error", "unsupported"),
    E.NotFoundError: _Row(404, "invalid_request_error", "not_found"),
    E.RequestCancelledError: _Row(499, "invalid_request_error", "cancelled", "request cancelled"),
    E.EngineTimeoutError: _Row(
        504, "timeout_error", "engine_timeout", "the engine did not answer in time"
    ),
    E.EngineError: _Row(502, "engine_error", "engine_error", "engine failure"),
    E.StoreError: _Row(
        503, "service_unavailable", "store_unavailable", "metadata store unavailable"
    ),
    E.RecordError: _Row(500, "server_error", "corrupt_record"),
}


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the APIError the client sees."""
    if isinstance(exc, APIError):
        return exc
    row = next((_HTTP[c] for c in type(exc).__mro__ if c in _HTTP), None)
    if row is None:
        log.error("unhandled error in the gateway", exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
    message = f"{row.prefix}: {exc}" if row.prefix else str(exc)
    return APIError(row.status, message, type=row.type, code=row.code)


def install_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        # deployment specs are 422 (the REST convention the deployments API documents);
        # OpenAI routes answer 400 for invalid parameters, as OpenAI does
        status = 422 if request.url.path.startswith("/v1/deployments") else 400
        return validation_error(exc, status=status).response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 413: "request_too_large"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(APIError, on_error)
    app.add_exception_handler(E.DeepInferError, on_error)
    app.add_exception_handler(Exception, on_error)
