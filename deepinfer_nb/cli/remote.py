"""The deployment commands' HTTP client: one gateway URL, one API key, one error table.

    --gateway URL      default: $DEEPINFER_GATEWAY, else http://127.0.0.1:<[server] port>
    --api-key-env VAR  default: DEEPINFER_API_KEY (used when set; the gateway may need none)

Every failure becomes a `CommandError` carrying the exit code (1 failed, 2 usage) and one line
that says what to do next; `cli.main` prints it. A gateway error's own message (OpenAI error
schema) is shown as is: the gateway already words it for the user.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx

from ..config import Settings
from ..errors import DeepInferError

GATEWAY_ENV = "DEEPINFER_GATEWAY"
API_KEY_ENV = "DEEPINFER_API_KEY"
EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandError(DeepInferError):
    """A client command that failed; `code` is its exit status."""

    def __init__(self, message: str, *, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gateway",
        metavar="URL",
        default=None,
        help=f"gateway base URL (default ${GATEWAY_ENV}, else http://127.0.0.1:8082)",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        default=API_KEY_ENV,
        help=f"environment variable holding the gateway API key (default {API_KEY_ENV})",
    )


def gateway_url(flag: str | None, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    url = flag or env.get(GATEWAY_ENV) or f"http://127.0.0.1:{Settings().server.port}"
    if not url.startswith(("http://", "https://")):
        raise CommandError(
            f"--gateway {url!r}: give a URL such as http://127.0.0.1:8082", code=EXIT_USAGE
        )
    return url.rstrip("/")


class Gateway:
    """Synchronous calls to one gateway; every method raises `CommandError` on failure."""

    def __init__(self, url: str, *, api_key: str = "", timeout: float = 30.0) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self.status = 0
        """The HTTP status of the last `request` (201 created vs 200 unchanged)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Gateway:
        key_var = args.api_key_env or ""
        if key_var != API_KEY_ENV and not os.environ.get(key_var):
            raise CommandError(
                f"--api-key-env {key_var}: that variable is not set; export {key_var}=<key>",
                code=EXIT_USAGE,
            )
        return cls(gateway_url(args.gateway), api_key=os.environ.get(key_var, "").strip())

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        self._check(response)
        self.status = response.status_code
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def stream_lines(self, path: str, body: dict[str, Any]) -> Iterator[str]:
        """POST `body` and yield the response's lines as they arrive (SSE)."""
        try:
            with self._http.stream("POST", path, json=body, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                yield from response.iter_lines()
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: Exception) -> CommandError:
        return CommandError(
            f"cannot reach the gateway at {self.url} ({type(exc).__name__}): start one "
            f"(`deepinfer-nb up`) or point at it with --gateway URL / ${GATEWAY_ENV}"
        )

    def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        message, code = _error_of(response)
        if code == "deployment_not_found":
            message += "; `deepinfer-nb ls` lists the deployments"
        if response.status_code == 401:
            raise CommandError(
                f"{message}: export {API_KEY_ENV}=<key> (or name another variable with "
                "--api-key-env)"
            )
        # 422: the gateway rejected what was typed (a bad device, name, engine arg value)
        exit_code = EXIT_USAGE if response.status_code == 422 else EXIT_FAILED
        raise CommandError(message, code=exit_code)


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """The message and code of an OpenAI-schema error answer (or a short account of another)."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"HTTP {response.status_code} from the gateway: {response.text[:200].strip()}", ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"]), str(error.get("code") or "")
    return f"HTTP {response.status_code} from the gateway: {json.dumps(body)[:200]}", ""
