"""Gateway security: API keys, request body caps, and the bind-address rule.

`SecurityMiddleware` is plain ASGI (no per-request task or body buffering, so streaming and
client-disconnect detection are untouched): it answers 401 unless the request carries
`Authorization: Bearer <key>` matching one of the keys (compared with `hmac.compare_digest`,
every key checked so timing does not reveal which one matched), and 413 once a body exceeds the
cap, whether it declares a Content-Length or arrives chunked. `/health` stays open for probes.
`check_bind` refuses to serve on a non-loopback address without a key.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ConfigError
from .errors import APIError, unauthorized

OPEN_PATHS = frozenset({"/health"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_keys: Iterable[str]) -> None:
    """Raise ConfigError if `host` is reachable from other machines and no API key is set."""
    if not is_loopback(host) and not any(api_keys):
        raise ConfigError(
            f"refusing to bind the gateway to {host} without an API key: anyone who can reach "
            "it could run and delete deployments. Set a key in an environment variable and name "
            "it, e.g. `export DEEPINFER_API_KEY=$(python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')` then `--api-key-env DEEPINFER_API_KEY` "
            "(or `api_key_env` in the [server] section of the config file), or bind 127.0.0.1."
        )


def key_matches(presented: str, keys: Iterable[str]) -> bool:
    given = presented.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok


class SecurityMiddleware:
    def __init__(
        self, app: ASGIApp, *, api_keys: Iterable[str] = (), max_body_bytes: int = 4 << 20
    ) -> None:
        self.app = app
        self.keys = tuple(k for k in api_keys if k)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.keys and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            err = unauthorized(
                "Missing or invalid API key: send `Authorization: Bearer <key>`"
                if self._bearer(scope) is None
                else "Invalid API key"
            )
            await err.response()(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        await self._call_capped(scope, receive, send)

    async def _call_capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    # FastAPI lets an HTTPException raised while reading the body through to
                    # the app's handler, which renders it as an OpenAI error
                    raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, capped_receive, send)

    def _too_large(self) -> APIError:
        return APIError(
            413, f"request body larger than {self.max_body_bytes} bytes", code="request_too_large"
        )

    @staticmethod
    def _bearer(scope: Scope) -> str | None:
        auth = _header(scope, b"authorization")
        if auth is None or not auth[:7].lower() == "bearer ":
            return None
        return auth[7:].strip()

    def _authorized(self, scope: Scope) -> bool:
        token = self._bearer(scope)
        return token is not None and key_matches(token, self.keys)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
