"""Every row of the error boundaries (errors.py): a gRPC status from an engine -> the exception the
client raises -> the HTTP status and OpenAI type the gateway answers -> whether the gateway tried
another replica; the status the shim sends for each class; the etcd, magics and poll_ready rules.

Engines are the real shim (servicer, gRPC server, client) over the FakeBackend, or the gateway's
fake fleet where a status must be forced that no exception class sends.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import pytest_asyncio

from deepinfer_nb import errors as E
from deepinfer_nb._proto import engine_service_pb2 as pb
from deepinfer_nb.engine.client import EngineClient, error_from_rpc
from deepinfer_nb.engine.process import poll_ready
from deepinfer_nb.engine.status import status_for
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.gateway.errors import to_api_error
from deepinfer_nb.models import Engine, EngineState
from deepinfer_nb.nb.magics import usage_error
from deepinfer_nb.store import keys
from deepinfer_nb.store.etcd import EtcdStore
from deepinfer_nb.store.memory import MemoryStore
from deepinfer_nb.testing import FakeBackend, InProcessShim, running_shim

from .gateway.fakes import Behaviour, FakeFleet, put_deployment, put_engine

C = grpc.StatusCode


@dataclasses.dataclass(frozen=True)
class Row:
    code: grpc.StatusCode
    cls: type[E.EngineError]
    http: int
    type: str
    retried: bool

    def __str__(self) -> str:
        return self.code.name


ROWS = [
    # client-caused: 4xx, never retried
    Row(C.INVALID_ARGUMENT, E.InvalidRequestError, 400, "invalid_request_error", False),
    Row(C.OUT_OF_RANGE, E.InvalidRequestError, 400, "invalid_request_error", False),
    Row(C.FAILED_PRECONDITION, E.UnsupportedTaskError, 400, "invalid_request_error", False),
    Row(C.UNIMPLEMENTED, E.UnsupportedFeatureError, 400, "invalid_request_error", False),
    Row(C.NOT_FOUND, E.NotFoundError, 404, "invalid_request_error", False),
    Row(C.CANCELLED, E.RequestCancelledError, 499, "invalid_request_error", False),
    # the gateway's engine token refused: not the HTTP client's fault, and not healed by a retry
    Row(C.UNAUTHENTICATED, E.AuthenticationError, 502, "engine_error", False),
    Row(C.PERMISSION_DENIED, E.AuthenticationError, 502, "engine_error", False),
    # engine faults before the first byte: another replica is tried
    Row(C.UNAVAILABLE, E.EngineUnavailableError, 502, "engine_error", True),
    Row(C.DEADLINE_EXCEEDED, E.EngineTimeoutError, 504, "timeout_error", True),
    Row(C.INTERNAL, E.EngineError, 502, "engine_error", True),
    Row(C.UNKNOWN, E.EngineError, 502, "engine_error", True),
    Row(C.RESOURCE_EXHAUSTED, E.EngineError, 502, "engine_error", True),
    Row(C.ABORTED, E.EngineError, 502, "engine_error", True),
    Row(C.DATA_LOSS, E.EngineError, 502, "engine_error", True),
]
# the status the shim sends for each class (the first of its rows)
SENT = {r.cls: r.code for r in reversed(ROWS)}


def rpc_error(code: grpc.StatusCode, details: str = "the shim says why") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def chat(**sampling: object) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content="hi")],
        sampling=pb.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


# ---- gRPC: status -> exception (client), exception -> status (shim) ---------------------------


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_client_decodes_each_status(row: Row) -> None:
    err = error_from_rpc(rpc_error(row.code))
    assert type(err) is row.cls
    assert "the shim says why" in str(err)
    assert E.is_temporary(err) is row.retried


@pytest.mark.parametrize("cls", list(SENT), ids=lambda c: c.__name__)
async def test_shim_sends_the_status_of_each_class(cls: type[E.EngineError]) -> None:
    assert status_for(cls("x")) == SENT[cls]
    backend = FakeBackend(error=cls("the backend says why"))
    async with running_shim(backend, token="t") as shim, shim.client() as client:
        with pytest.raises(cls, match="the backend says why") as unary:
            await client.chat(chat(max_tokens=4))
        with pytest.raises(cls, match="the backend says why"):
            async for _ in client.chat_stream(chat(max_tokens=4)):
                pass
    assert type(unary.value) is cls


async def test_shim_answers_an_unexpected_exception_as_internal() -> None:
    backend = FakeBackend(error=ZeroDivisionError("division by zero"))
    async with running_shim(backend) as shim, shim.client() as client:
        with pytest.raises(E.EngineError, match="ZeroDivisionError: division by zero") as err:
            await client.chat(chat(max_tokens=4))
    assert type(err.value) is E.EngineError and E.is_temporary(err.value)


async def test_unreachable_engine_is_unavailable_and_named() -> None:
    async with EngineClient("127.0.0.1:1") as client:
        with pytest.raises(E.EngineUnavailableError, match=r"127\.0\.0\.1:1"):
            await client.health(timeout=2.0)


# ---- HTTP: exception -> status and OpenAI type; retried on another replica or not -------------


@pytest_asyncio.fixture
async def fleet_gateway() -> AsyncIterator[tuple[GatewayServer, FakeFleet]]:
    store, fleet = MemoryStore(), FakeFleet()
    await put_deployment(store, "smol")
    await put_engine(store, "smol", 0)
    await put_engine(store, "smol", 1)
    app = build_app(store, client_factory=fleet.factory)
    async with GatewayServer(app, host="127.0.0.1", port=0) as server:
        yield server, fleet
    await store.close()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("row", ROWS, ids=str)
async def test_gateway_answers_each_row(
    fleet_gateway: tuple[GatewayServer, FakeFleet], row: Row, stream: bool
) -> None:
    gw, fleet = fleet_gateway
    for endpoint in ("10.0.0.1:5000", "10.0.0.2:5000"):
        fleet.behaviour[endpoint] = Behaviour(mode="status", status=row.code)
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == row.http, r.text
    assert r.json()["error"]["type"] == row.type
    assert "the shim says why" in r.json()["error"]["message"]
    assert sum(fleet.calls.values()) == (2 if row.retried else 1)


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (E.StoreUnavailableError("etcd down"), 503, "service_unavailable"),
        (E.LeaseLostError("lease gone"), 503, "service_unavailable"),
        (E.RecordError("/k", "bad json"), 500, "server_error"),
        (RuntimeError("a bug"), 500, "server_error"),
    ],
)
def test_gateway_answers_other_errors(exc: BaseException, status: int, type_: str) -> None:
    err = to_api_error(exc)
    assert (err.status, err.type) == (status, type_)


async def _engine_at(store: MemoryStore, name: str, replica: int, endpoint: str) -> None:
    engine = Engine(
        id=f"{name}-{replica}",
        deployment=name,
        replica=replica,
        state=EngineState.RUNNING,
        endpoint=endpoint,
        auth_token="t",
    )
    await store.put(keys.engine(engine.id), engine.encode())


@dataclasses.dataclass
class Replicas:
    """Two deployments of two real shims each (FakeBackends behind real gRPC), whose models the
    gateway's catalog does not know, so only the engines can refuse a wrong task."""

    http: httpx.AsyncClient
    shims: dict[str, tuple[InProcessShim, InProcessShim]]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replicas() -> AsyncIterator[Replicas]:
    store = MemoryStore()
    async with contextlib.AsyncExitStack() as stack:
        shims: dict[str, tuple[InProcessShim, InProcessShim]] = {}
        for name, task in (("smol", "generate"), ("mini", "embed")):
            pair = [
                await stack.enter_async_context(running_shim(FakeBackend(task=task), token="t"))
                for _ in range(2)
            ]
            shims[name] = (pair[0], pair[1])
            await put_deployment(store, name, model=f"some-org/{name}-unknown-here")
            for replica, shim in enumerate(pair):
                await _engine_at(store, name, replica, shim.endpoint)
        gw = await stack.enter_async_context(
            GatewayServer(build_app(store), host="127.0.0.1", port=0)
        )
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=gw.url, timeout=30))
        yield Replicas(http, shims)
    await store.close()


@dataclasses.dataclass(frozen=True)
class Ask:
    """One HTTP request, the deployment it names and the RPC the gateway sends for it."""

    path: str
    body: dict[str, object]
    rpc: str

    @property
    def deployment(self) -> str:
        return str(self.body["model"])

    def of(self, deployment: str) -> Ask:
        return dataclasses.replace(self, body={**self.body, "model": deployment})


_CHAT: dict[str, object] = {"model": "smol", "messages": [{"role": "user", "content": "hi"}]}
ASKS = {
    "chat": Ask("/v1/chat/completions", _CHAT, "Chat"),
    "chat-stream": Ask("/v1/chat/completions", {**_CHAT, "stream": True}, "ChatStream"),
    "completion": Ask("/v1/completions", {"model": "smol", "prompt": "hi"}, "Generate"),
    "embeddings": Ask("/v1/embeddings", {"model": "mini", "input": ["a", "b"]}, "CreateEmbedding"),
}


async def _post(replicas: Replicas, ask: Ask) -> tuple[httpx.Response, list[int]]:
    """The gateway's answer, and how often each replica of the deployment received the RPC."""
    pair = replicas.shims[ask.deployment]
    for shim in pair:
        shim.rpcs.clear()
    r = await replicas.http.post(ask.path, json=ask.body)
    return r, [shim.rpcs[ask.rpc] for shim in pair]


async def _one_engine_asked(
    replicas: Replicas, ask: Ask, *, status: int, type_: str, says: str
) -> None:
    """`status` with OpenAI error `type_` and a message with `says`, from exactly one engine asked
    once; the other replica, which would answer the same, never."""
    r, asked = await _post(replicas, ask)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == type_
    assert says in r.json()["error"]["message"]
    assert sorted(asked) == [0, 1], asked


@pytest.mark.parametrize(
    ("ask", "says"),
    [
        (ASKS["embeddings"].of("smol"), "not embeddings"),
        (ASKS["chat"].of("mini"), "not chat completions"),
        (ASKS["chat-stream"].of("mini"), "not chat completions"),
        (ASKS["completion"].of("mini"), "not completions"),
    ],
    ids=["embeddings-of-generate", "chat-of-embed", "chat-stream-of-embed", "completion-of-embed"],
)
async def test_wrong_task_is_refused_by_one_engine_only(
    replicas: Replicas, ask: Ask, says: str
) -> None:
    """Asked of the wrong deployment, the shim answers FAILED_PRECONDITION: a 400
    invalid_request_error, and the second replica is never tried."""
    await _one_engine_asked(replicas, ask, status=400, type_="invalid_request_error", says=says)


@pytest.mark.parametrize("ask", list(ASKS.values()), ids=list(ASKS))
@pytest.mark.parametrize(
    "row", [r for r in ROWS if not r.retried and SENT[r.cls] is r.code], ids=str
)
async def test_client_caused_errors_come_from_one_engine_only(
    replicas: Replicas, row: Row, ask: Ask
) -> None:
    """Each client-caused status, raised by both replicas' engines: the gateway answers its row's
    HTTP status and type from the one replica it asked."""
    pair = replicas.shims[ask.deployment]
    for shim in pair:
        shim.backend.error = row.cls("the backend says why")
    try:
        await _one_engine_asked(
            replicas, ask, status=row.http, type_=row.type, says="the backend says why"
        )
    finally:
        for shim in pair:
            shim.backend.error = None


async def test_the_shims_own_invalid_argument_comes_from_one_engine_only(
    replicas: Replicas,
) -> None:
    """A request the shim's validation refuses (more tokens than the context window)."""
    ask = Ask("/v1/chat/completions", {**_CHAT, "max_tokens": 1_000_000}, "Chat")
    await _one_engine_asked(
        replicas, ask, status=400, type_="invalid_request_error", says="max_tokens"
    )


@pytest.mark.parametrize("ask", list(ASKS.values()), ids=list(ASKS))
async def test_an_engine_fault_is_retried_on_the_other_replica(
    replicas: Replicas, ask: Ask
) -> None:
    """The contrast: an engine fault before the first byte (UNAVAILABLE from both) is tried on
    each replica once, then answered 502."""
    pair = replicas.shims[ask.deployment]
    for shim in pair:
        shim.backend.error = E.EngineUnavailableError("the backend says why")
    try:
        r, asked = await _post(replicas, ask)
    finally:
        for shim in pair:
            shim.backend.error = None
    assert r.status_code == 502, r.text
    assert r.json()["error"]["type"] == "engine_error"
    assert asked == [1, 1]


# ---- the other boundaries: etcd, magics, polling an engine until READY ------------------------


@pytest.mark.parametrize(
    ("code", "details", "idempotent", "user", "cls", "temporary"),
    [
        (C.UNAVAILABLE, "connection refused", False, "", E.StoreUnavailableError, True),
        (C.DEADLINE_EXCEEDED, "deadline", True, "", E.StoreUnavailableError, True),
        # a write that timed out may have been applied: never sent again
        (C.DEADLINE_EXCEEDED, "deadline", False, "", E.StoreError, False),
        (C.UNAUTHENTICATED, "invalid auth token", True, "u", E.StoreUnavailableError, True),
        (C.UNAUTHENTICATED, "user name is empty", True, "", E.StoreError, False),
        (C.NOT_FOUND, "requested lease not found", False, "", E.LeaseLostError, False),
        (
            C.OUT_OF_RANGE,
            "required revision has been compacted",
            True,
            "",
            E.RevisionCompactedError,
            False,
        ),
        (C.INVALID_ARGUMENT, "bad request", False, "", E.StoreError, False),
    ],
)
def test_etcd_status_rows(
    code: grpc.StatusCode,
    details: str,
    idempotent: bool,
    user: str,
    cls: type[E.StoreError],
    temporary: bool,
) -> None:
    store = EtcdStore("etcd://127.0.0.1:1", etcd_user=user, etcd_password="p" if user else "")
    err = store._error(rpc_error(code, details), "get k", idempotent=idempotent)
    assert type(err) is cls and E.is_temporary(err) is temporary
    assert details in str(err)


@pytest.mark.parametrize(
    ("exc", "says"),
    [
        (E.StoreUnavailableError("etcd at x unreachable"), "%deepinfer doctor"),
        (E.RecordError("/deepinfer/v1/deployments/a", "bad json"), "%deepinfer rm"),
        (E.RuntimeTimeoutError("timed out after 5 s"), "run the cell again"),
        (E.DeploymentError("no deployment named 'a'"), "no deployment named 'a'"),
        (E.InvalidRequestError("max_tokens must be >= 1"), "max_tokens must be >= 1"),
    ],
)
def test_magics_usage_error_rows(exc: E.DeepInferError, says: str) -> None:
    err = usage_error(exc)
    assert str(exc) in str(err) and says in str(err)


async def test_poll_ready_raises_a_permanent_error_at_once() -> None:
    async with running_shim(token="right") as shim, shim.client(token="wrong") as client:
        with pytest.raises(E.AuthenticationError, match="wrong engine token"):
            await poll_ready(client, alive=lambda: True, timeout=30, interval=0.05)


async def test_poll_ready_waits_through_loading_and_unreachable() -> None:
    async with running_shim(ready=False) as shim, shim.client() as client:
        assert await poll_ready(client, alive=lambda: True, timeout=0.3, interval=0.05) == "timeout"
        shim.servicer.mark_ready()
        assert await poll_ready(client, alive=lambda: True, timeout=5, interval=0.05) == "ready"
    async with EngineClient("127.0.0.1:1") as gone:
        outcome = await poll_ready(
            gone, alive=lambda: True, timeout=0.3, interval=0.05, health_timeout=0.2
        )
    assert outcome == "timeout"
