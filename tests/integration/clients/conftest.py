"""The two servers the client tests run against, started once per module, all at once:

- vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`), twice: SmolLM2 for
  chat and all-MiniLM-L6-v2 with the pooling runner for embeddings (one vLLM server serves one
  model);
- our gateway on a real uvicorn, in front of an in-process controller and worker over the memory
  store, with two deployments of the same two models (one shim + vLLM engine each).

Same models and flags on both sides: eager, the CPU's best dtype, max_model_len 2048 for chat,
VLLM_CPU_KVCACHE_SPACE=1 (whole GiB only: an empty value breaks vLLM's CPU worker, and when set
it overrides --kv-cache-memory-bytes). `Server` tells a test where to go and which model names
to use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from deepinfer_nb.config import Settings
from deepinfer_nb.control.controller import Controller
from deepinfer_nb.control.worker import Worker
from deepinfer_nb.engine import local_models
from deepinfer_nb.engine.cpu_dtype import best_cpu_dtype
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState
from deepinfer_nb.store import decode_record, keys
from deepinfer_nb.store.memory import MemoryStore

# litellm fetches a model price map from the internet when imported, unless told to use its own
# copy: these tests reach only 127.0.0.1.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

CHAT_ALIAS = "smollm2-135m-instruct"
EMBED_ALIAS = "all-minilm-l6-v2"
CHAT = "smollm2"  # the served model names, the same on both sides
EMBED = "minilm"
API_KEY = "sk-clients-test"
START_TIMEOUT_S = 600.0
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclasses.dataclass(frozen=True)
class Server:
    name: str  # vllm | gateway
    chat_url: str  # base URL of the OpenAI API (".../v1") serving CHAT
    embed_url: str  # ... serving EMBED (the same URL on the gateway)
    api_key: str = API_KEY


@dataclasses.dataclass
class Servers:
    vllm: Server
    gateway: Server
    worker: Worker
    store: MemoryStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def vllm_openai_server(folder: str, *, served: str, extra: list[str]) -> AsyncIterator[str]:
    """vLLM's own OpenAI server on a free loopback port; yields its ".../v1" URL."""
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix=f"vllm-{served}-", suffix=".log")[1])
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        folder,
        "--served-model-name",
        served,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--enforce-eager",
        "--dtype",
        best_cpu_dtype(),
        *extra,
    ]
    proc = _spawn(cmd, log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                if proc.poll() is not None:
                    pytest.fail(
                        f"vLLM's server for {served} exited {proc.returncode}:\n{_tail(log)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url + "/health")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"vLLM's server for {served} not ready in {START_TIMEOUT_S:.0f} s")
                await asyncio.sleep(1)
        yield url + "/v1"
    finally:
        _stop(proc, log)


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENV},
            start_new_session=True,  # its own group: the API server and its EngineCore end together
        )


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:])


def _stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.unlink(missing_ok=True)


async def _wait_running(store: MemoryStore, worker: Worker, n: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        result = await store.range(keys.ENGINES)
        engines = [decode_record(Engine, kv.key, kv.value) for kv in result.items]
        states = [e.state for e in engines if e is not None]
        if states.count(EngineState.RUNNING) == n:
            return
        failed = [e for e in engines if e is not None and e.state is EngineState.FAILED]
        if failed or time.monotonic() > deadline:
            logs = "\n".join("\n".join(worker.logs(e.id, 30)) for e in engines if e is not None)
            pytest.fail(f"engines not Running ({states}): {[e.error for e in failed]}\n{logs}")
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def gateway_cluster() -> AsyncIterator[tuple[str, Worker, MemoryStore]]:
    settings = Settings()
    settings.scheduler.reconcile_interval_s = 0.5
    store = MemoryStore()
    controller = Controller(store, settings=settings.scheduler)
    running = asyncio.create_task(controller.run())
    worker = Worker(
        store,
        node_id="clients-node",
        settings=settings,
        home=Path(tempfile.mkdtemp(prefix="deepinfer-clients-")),
    )
    await worker.start()
    for spec in (
        DeploymentSpec(
            name=CHAT,
            model=CHAT_ALIAS,
            device="cpu",
            enforce_eager=True,
            max_model_len=2048,
            env=ENV,
        ),
        # an encoder keeps its own window (256 tokens for MiniLM), on vLLM's server too; written
        # straight to the store (no preflight reads its config.json), so the task is named
        DeploymentSpec(
            name=EMBED,
            model=EMBED_ALIAS,
            task="embed",
            device="cpu",
            enforce_eager=True,
            env=ENV,
        ),
    ):
        await store.put(keys.deployment(spec.name), spec.encode())
    server = GatewayServer(
        build_app(store, settings=settings, api_keys=[API_KEY]), host="127.0.0.1", port=0
    )
    await server.start()
    try:
        await _wait_running(store, worker, 2)
        yield server.url + "/v1", worker, store
    finally:
        await server.stop()
        await worker.stop()
        await controller.stop()
        await asyncio.gather(running, return_exceptions=True)
        await store.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def servers() -> AsyncIterator[Servers]:
    chat_dir = str(local_models.build(local_models.CATALOG[CHAT_ALIAS]))
    embed_dir = str(local_models.build(local_models.CATALOG[EMBED_ALIAS]))
    async with contextlib.AsyncExitStack() as stack:
        # all at once; every start ends (and is registered for clean-up) before a failure of one
        # of them fails the fixture
        started = await asyncio.gather(
            stack.enter_async_context(
                vllm_openai_server(chat_dir, served=CHAT, extra=["--max-model-len", "2048"])
            ),
            stack.enter_async_context(
                vllm_openai_server(embed_dir, served=EMBED, extra=["--runner", "pooling"])
            ),
            stack.enter_async_context(gateway_cluster()),
            return_exceptions=True,
        )
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        chat, embed, (gw, worker, store) = started  # type: ignore[misc]
        yield Servers(
            vllm=Server("vllm", chat, embed),
            gateway=Server("gateway", gw, gw),
            worker=worker,
            store=store,
        )


@pytest.fixture(params=["vllm", "gateway"])
def server(request: pytest.FixtureRequest, servers: Servers) -> Server:
    """Each client test runs against vLLM's own server and against our gateway."""
    return getattr(servers, request.param)  # type: ignore[no-any-return]
