"""The runtime thread: results, timeouts, interrupts cancel cleanly, failed binds are clear."""

from __future__ import annotations

import _thread
import asyncio
import socket
import threading

import pytest
import uvloop  # the gateway extra installs it (and vLLM depends on it)

from deepinfer_nb import procenv
from deepinfer_nb.client import runtime as rt
from deepinfer_nb.config import Settings
from deepinfer_nb.errors import DeepInferError
from deepinfer_nb.netutil import bind_socket
from deepinfer_nb.services import ServiceSet


@pytest.fixture
def runtime():
    r = rt.Runtime(name="test-runtime")
    r.start()
    yield r
    r.stop()


def test_run_returns_result_on_its_own_thread(runtime: rt.Runtime) -> None:
    async def where() -> str:
        await asyncio.sleep(0)
        return threading.current_thread().name

    assert runtime.run(where(), timeout=5) == "test-runtime"


def test_loops_are_uvloop_where_installed(runtime: rt.Runtime) -> None:
    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert runtime.run(loop_type(), timeout=5) is uvloop.Loop
    assert procenv.run(loop_type()) is uvloop.Loop  # the CLI processes and the shim


def test_start_is_idempotent(runtime: rt.Runtime) -> None:
    loop = runtime.loop
    runtime.start()
    assert runtime.loop is loop


def test_timeout_cancels_the_coroutine(runtime: rt.Runtime) -> None:
    seen: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    with pytest.raises(rt.RuntimeTimeoutError):
        runtime.run(slow(), timeout=0.2)
    assert seen == ["cancelled"]


def test_keyboard_interrupt_cancels_and_cleans_up(runtime: rt.Runtime) -> None:
    seen: list[str] = []

    async def long_call() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            # what an engine stream does on cancel: one more await to abort the request
            await asyncio.sleep(0.05)
            seen.append("cleaned up")

    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        runtime.run(long_call(), timeout=20)
    assert seen == ["cleaned up"]
    # the loop is still usable afterwards
    assert runtime.run(asyncio.sleep(0, result=7), timeout=5) == 7


def test_exceptions_propagate(runtime: rt.Runtime) -> None:
    async def boom() -> None:
        raise DeepInferError("nope")

    with pytest.raises(DeepInferError, match="nope"):
        runtime.run(boom(), timeout=5)


def test_run_from_the_loop_thread_is_refused(runtime: rt.Runtime) -> None:
    async def nested() -> str:
        try:
            runtime.run(asyncio.sleep(0), timeout=1)
        except DeepInferError as exc:
            return str(exc)
        return "no error"

    assert "deadlock" in runtime.run(nested(), timeout=5)


def test_the_one_socket_binder_reports_a_taken_port() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(DeepInferError, match=f"cannot bind the gateway to 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
    finally:
        taken.close()


def test_services_stop_in_reverse_order(runtime: rt.Runtime) -> None:
    order: list[str] = []
    services = ServiceSet(Settings())

    def stopper(name: str):
        async def stop() -> None:
            order.append(name)
            if name == "b":
                raise RuntimeError("b fails to stop")

        return stop

    for name in "abc":
        services.callback(name, stopper(name))
    runtime.run(services.aclose(), timeout=5)
    assert order == ["c", "b", "a"]
