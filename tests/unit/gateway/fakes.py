"""A fake engine fleet for the gateway's unit tests: `EngineClient`-shaped objects whose
behaviour per endpoint is set by the test (answer, refuse as unavailable, fail mid-stream, hang).

The real shim is exercised by tests/integration/gateway; here a fake is the honest tool to make
one replica refuse, count which replica answered, and check cancellation deterministically.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc

from deepinfer_nb._proto import engine_service_pb2 as pb
from deepinfer_nb.engine.client import error_from_rpc
from deepinfer_nb.errors import EngineError, EngineUnavailableError, InvalidRequestError
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState
from deepinfer_nb.store import MetaStore, keys


@dataclasses.dataclass
class Behaviour:
    mode: str = "ok"  # ok | unavailable | invalid | fail_mid | hang | status
    words: tuple[str, ...] = ("The", " capital", " of", " France", " is", " Paris", ".")
    status: grpc.StatusCode = grpc.StatusCode.OK
    """mode "status": the call fails with this gRPC status, decoded by the real client's table."""


class FakeFleet:
    """Behaviour per endpoint, and what each endpoint was asked."""

    def __init__(self) -> None:
        self.behaviour: dict[str, Behaviour] = {}
        self.calls: Counter[str] = Counter()
        self.requests: list[Any] = []
        self.cancelled: list[str] = []
        self.tokens: dict[str, str] = {}
        self.closed: list[str] = []
        self.metrics: dict[str, pb.MetricsResponse] = {}
        """What `GetMetrics` answers per endpoint (default: all zero)."""

    def factory(self, endpoint: str, *, token: str = "", timeout: float | None = None) -> Any:
        self.tokens[endpoint] = token
        return FakeClient(self, endpoint)


class FakeClient:
    def __init__(self, fleet: FakeFleet, endpoint: str) -> None:
        self.fleet = fleet
        self.endpoint = endpoint

    def _behaviour(self, request: Any) -> Behaviour:
        self.fleet.calls[self.endpoint] += 1
        self.fleet.requests.append(request)
        b = self.fleet.behaviour.get(self.endpoint, Behaviour())
        if b.mode == "unavailable":
            raise EngineUnavailableError(f"connection refused (engine {self.endpoint})")
        if b.mode == "invalid":
            raise InvalidRequestError("max_tokens 5000 exceeds the context window")
        if b.mode == "status":
            raise error_from_rpc(
                grpc.aio.AioRpcError(
                    b.status, grpc.aio.Metadata(), grpc.aio.Metadata(), details="the shim says why"
                ),
                endpoint=self.endpoint,
            )
        return b

    def _choices(self, request: Any, b: Behaviour) -> list[pb.Choice]:
        n = request.sampling.n or 1
        limit = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 99
        words = b.words[:limit]
        reason = "length" if limit < len(b.words) else "stop"
        return [
            pb.Choice(
                index=i,
                text="".join(words),
                finish_reason=reason,
                token_ids=list(range(len(words))),
                logprobs=[
                    pb.TokenLogprob(
                        token=w, logprob=-0.5, top=[pb.TopLogprob(token=w, logprob=-0.5)]
                    )
                    for w in words
                ]
                if request.sampling.HasField("logprobs")
                else [],
            )
            for i in range(n)
        ]

    async def _unary(self, request: Any) -> pb.GenerateResponse:
        b = self._behaviour(request)
        if b.mode == "hang":
            await self._hang(request)
        choices = self._choices(request, b)
        completion = sum(len(c.token_ids) for c in choices)
        return pb.GenerateResponse(
            request_id=request.request_id,
            choices=choices,
            usage=pb.Usage(
                prompt_tokens=7, completion_tokens=completion, total_tokens=7 + completion
            ),
        )

    async def _hang(self, request: Any) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.fleet.cancelled.append(request.request_id)
            raise

    async def _stream(self, request: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
        b = self._behaviour(request)
        choices = self._choices(request, b)
        words = len(choices[0].token_ids)
        try:
            for k in range(words):
                if b.mode == "fail_mid" and k == 2:
                    raise EngineError("engine core died")
                deltas = []
                for c in choices:
                    lp = [c.logprobs[k]] if c.logprobs else []
                    done = k == words - 1
                    deltas.append(
                        pb.Choice(
                            index=c.index,
                            text=b.words[k],
                            token_ids=[k],
                            logprobs=lp,
                            finish_reason=c.finish_reason if done else "",
                        )
                    )
                yield pb.GenerateStreamResponse(request_id=request.request_id, deltas=deltas)
                if b.mode == "hang" and k == 1:
                    await self._hang(request)
            completion = words * len(choices)
            yield pb.GenerateStreamResponse(
                request_id=request.request_id,
                finished=True,
                usage=pb.Usage(
                    prompt_tokens=7, completion_tokens=completion, total_tokens=7 + completion
                ),
            )
        except GeneratorExit:
            self.fleet.cancelled.append(request.request_id)
            raise

    async def chat(self, request: pb.ChatRequest, **_: Any) -> pb.GenerateResponse:
        return await self._unary(request)

    async def generate(self, request: pb.GenerateRequest, **_: Any) -> pb.GenerateResponse:
        return await self._unary(request)

    def chat_stream(
        self, request: pb.ChatRequest, **_: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self._stream(request)

    def generate_stream(
        self, request: pb.GenerateRequest, **_: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self._stream(request)

    async def embed(self, request: pb.EmbeddingRequest, **_: Any) -> pb.EmbeddingResponse:
        self._behaviour(request)
        data = [
            pb.Embedding(index=i, values=[0.5, -1.0, float(len(t))])
            for i, t in enumerate(request.input)
        ]
        return pb.EmbeddingResponse(data=data, usage=pb.Usage(prompt_tokens=3, total_tokens=3))

    async def metrics(self) -> pb.MetricsResponse:
        # the gateway's background poll: not a request, so not counted in `calls`
        return self.fleet.metrics.get(self.endpoint, pb.MetricsResponse())

    async def close(self) -> None:
        self.fleet.closed.append(self.endpoint)


async def put_deployment(store: MetaStore, name: str, **kw: Any) -> DeploymentSpec:
    spec = DeploymentSpec(name=name, model=kw.pop("model", "smollm2-135m-instruct"), **kw)
    await store.put(keys.deployment(name), spec.encode())
    return spec


async def put_engine(
    store: MetaStore,
    deployment: str,
    replica: int,
    *,
    state: EngineState = EngineState.RUNNING,
    endpoint: str = "",
    **kw: Any,
) -> Engine:
    engine = Engine(
        id=f"{deployment}-{replica}-x",
        deployment=deployment,
        replica=replica,
        state=state,
        endpoint=endpoint or f"10.0.0.{replica + 1}:5000",
        auth_token=f"token-{replica}",
        **kw,
    )
    await store.put(keys.engine(engine.id), engine.encode())
    return engine
