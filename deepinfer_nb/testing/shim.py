"""The real engine shim (gRPC servicer and server) over a `FakeBackend`, in a process or in-process.

    python -m deepinfer_nb.testing.shim --model M --port P [every flag of python -m
        deepinfer_nb.engine] [-- engine args, ignored]

takes the command line a worker gives `python -m deepinfer_nb.engine` and serves the FakeBackend
configured by DEEPINFER_FAKE_* variables (see backend.py), so a worker launches, health-checks,
drains and kills it exactly as a vLLM shim. `running_shim()` serves one in the caller's event
loop instead (no process, no signal handlers) for tests of the servicer and its clients.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from ..engine.client import EngineClient
from ..engine.server import EngineServicer, build_server, serve
from .backend import FakeBackend

__all__ = ["InProcessShim", "main", "running_shim"]


@dataclasses.dataclass
class InProcessShim:
    endpoint: str
    token: str
    servicer: EngineServicer
    backend: FakeBackend
    rpcs: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """The RPCs this shim received, by method name ("Chat", "CreateEmbedding", ...), counted
    before any check: which replica a gateway asked, also for calls the shim refuses."""

    def client(self, *, token: str | None = None, timeout: float | None = None) -> EngineClient:
        """A new client of this shim (with its token unless `token` says otherwise); close it."""
        return EngineClient(
            self.endpoint, token=self.token if token is None else token, timeout=timeout
        )


@contextlib.asynccontextmanager
async def running_shim(
    backend: FakeBackend | None = None,
    *,
    token: str = "",
    model_name: str = "fake",
    grace_s: float = 5.0,
    ready: bool = True,
) -> AsyncIterator[InProcessShim]:
    """A shim on a free loopback port of this loop. `ready=False` leaves it STARTING (the
    model "loading") until the test calls `shim.servicer.mark_ready()`."""
    backend = backend or FakeBackend()
    servicer = EngineServicer(backend, model_name=model_name, default_grace_s=grace_s)
    rpcs: collections.Counter[str] = collections.Counter()
    server, port = build_server(
        servicer, host="127.0.0.1", port=0, token=token, interceptors=[_Counter(rpcs)]
    )
    await server.start()
    try:
        if ready:
            await backend.start()
            servicer.mark_ready()
        yield InProcessShim(f"127.0.0.1:{port}", token, servicer, backend, rpcs)
    finally:
        await server.stop(grace=None)
        await backend.shutdown()


class _Counter(grpc.aio.ServerInterceptor):
    def __init__(self, rpcs: collections.Counter[str]) -> None:
        self._rpcs = rpcs

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self._rpcs[details.method.rsplit("/", 1)[-1]] += 1
        return await continuation(details)


def main(argv: Sequence[str] | None = None) -> int:
    from ..engine.__main__ import build_parser, split_argv

    ours, _engine_args = split_argv(sys.argv[1:] if argv is None else argv)
    args, _unknown = build_parser().parse_known_args(ours)
    token = os.environ.get(args.auth_token_env, "") if args.auth_token_env else ""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        backend = FakeBackend.from_env(os.environ)
    except ValueError as exc:
        print(f"deepinfer-nb engine: bad fake engine settings: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(
        serve(
            backend,
            host=args.host,
            port=args.port,
            model_name=args.served_model_name or args.model,
            token=token,
            grace_period_s=args.grace_period,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
