"""Gateway security: scoped API keys, request body caps, and the bind-address rule.

`SecurityMiddleware` is plain ASGI (no per-request task or body buffering, so streaming and
client-disconnect detection are untouched). With keys configured it answers 401 unless the request
carries `Authorization: Bearer <key>` matching one of them (compared with `hmac.compare_digest`,
every key checked so timing does not reveal which one matched) and 403 when the key lacks the
route's scope (`required_scope`): `inference` for the OpenAI routes, `/v1/models`, `/metrics` and
the landing page `/` (it shows what `/v1/models` does, with states),
`admin` for everything else (deployments, engines, nodes, GPUs, docs; an unknown route is admin,
so a new route is closed until someone opens it). The key's name goes into the request state
(`request.state.principal`) for the audit fields of deployment records; without keys it is
"anonymous". `/health` stays open for probes, `/metrics` too when configured open. It answers
413 once a body exceeds the cap, whether it declares a Content-Length or arrives chunked.
`check_bind` refuses to serve on a non-loopback address without a key.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Sequence

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ADMIN, BOTH_SCOPES, INFERENCE, ApiKey
from ..errors import ConfigError
from .errors import APIError, forbidden, unauthorized

OPEN_PATHS = frozenset({"/health"})
INFERENCE_PATHS = frozenset(
    {"/", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/metrics"}
)
ANONYMOUS = "anonymous"


def required_scope(path: str) -> str:
    """The scope a request to `path` needs (deny by default: anything not listed is admin)."""
    if path in INFERENCE_PATHS or path.startswith("/v1/models/"):
        return INFERENCE
    return ADMIN


def as_keys(keys: Sequence[str | ApiKey]) -> tuple[ApiKey, ...]:
    """ApiKeys from a mix of keys and bare strings (a bare string has both scopes, as the
    single key of earlier versions did)."""
    out = []
    for i, key in enumerate(keys):
        if isinstance(key, str):
            if key:
                out.append(ApiKey("api-key" if i == 0 else f"api-key-{i + 1}", key, BOTH_SCOPES))
        elif key.secret:
            out.append(key)
    return tuple(out)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_keys: Iterable[str | ApiKey]) -> None:
    """Raise ConfigError if `host` is reachable from other machines and no API key is set."""
    if not is_loopback(host) and not any(api_keys):
        raise ConfigError(
            f"refusing to bind the gateway to {host} without an API key: anyone who can reach "
            "it could run and delete deployments. Set a key in an environment variable and name "
            "it, e.g. `export DEEPINFER_API_KEY=$(python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')` then `--api-key-env DEEPINFER_API_KEY` "
            "(or `api_key_env` in the [server] section of the config file), or bind 127.0.0.1."
        )


def match_key(presented: str, keys: Iterable[ApiKey]) -> ApiKey | None:
    """The key whose secret is `presented`, or None. Every key is compared (in constant time
    each), so the time taken does not depend on which key, if any, matched."""
    given = presented.encode()
    found = None
    for key in keys:
        if hmac.compare_digest(given, key.secret.encode()):
            found = key
    return found


class SecurityMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: Sequence[str | ApiKey] = (),
        metrics_open: bool = False,
        max_body_bytes: int = 4 << 20,
    ) -> None:
        self.app = app
        self.keys = as_keys(api_keys)
        self.open_paths = OPEN_PATHS | ({"/metrics"} if metrics_open else set())
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        principal = ANONYMOUS
        if self.keys and scope["path"] not in self.open_paths:
            err, principal = self._authorize(scope)
            if err is not None:
                await err.response()(scope, receive, send)
                return
        scope.setdefault("state", {})["principal"] = principal
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

    def _authorize(self, scope: Scope) -> tuple[APIError | None, str]:
        """(None, key name) when the request's key grants the route's scope, else the error."""
        token = self._bearer(scope)
        if token is None:
            return unauthorized("Missing API key: send `Authorization: Bearer <key>`"), ANONYMOUS
        key = match_key(token, self.keys)
        if key is None:
            return unauthorized("Invalid API key"), ANONYMOUS
        needed = required_scope(scope["path"])
        if needed not in key.scopes:
            return forbidden(
                f"API key {key.name!r} has the {'/'.join(sorted(key.scopes))} scope; "
                f"{scope['method']} {scope['path']} needs an {needed} key"
            ), key.name
        return None, key.name


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def describe_keys(keys: Sequence[ApiKey]) -> str:
    """One line on who may do what, for the gateway's start-up message."""
    if not keys:
        return "no API key"
    admin = [k.name for k in keys if ADMIN in k.scopes]
    inference = [k.name for k in keys if ADMIN not in k.scopes]
    text = f"admin keys: {', '.join(admin) or 'none'}; inference keys: {', '.join(inference)}"
    if not inference:
        text = (
            f"API keys {', '.join(admin)} have both scopes: whoever holds one can also create "
            "and delete deployments (hand external clients inference keys: [server] "
            "inference_keys_env)"
        )
    return text


def client_key_hint(
    keys: Sequence[ApiKey], *, default_var: str = "DEEPINFER_API_KEY"
) -> tuple[str, str]:
    """(environment variable, comment) for a snippet an external client runs: an inference key
    when one exists, else the key it would have to use, said to be able to deploy too. Only the
    variable's name is printed, never a key."""
    if not keys:
        return "", ""
    inference = [k for k in keys if ADMIN not in k.scopes]
    if inference:
        key = inference[0]
        return default_var, (
            f"{default_var}: the inference key {key.name!r} (from {key.source or 'the config'}; "
            "chat, completions, embeddings and models only)"
        )
    key = keys[0]
    var = key.source if key.name.startswith("api-key") and key.source else default_var
    return var, (
        f"{var}: the key {key.name!r}, which can also create and delete deployments; "
        "for clients you do not fully trust configure inference keys ([server] inference_keys_env)"
    )
