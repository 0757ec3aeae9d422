"""The magics and the Python API against ONE real cluster with one SmolLM2 engine on CPU:
deploy --wait, inline chat (Paris), streaming + interrupt aborts the request, the openai client
through the gateway, ls/status/logs/monitor, and `down` leaves no engine process behind."""

from __future__ import annotations

import _thread
import threading
import time

import psutil
import pytest
from IPython.core.interactiveshell import InteractiveShell

from deepinfer_nb.models import EngineState

pytestmark = pytest.mark.engine

NAME = "smol"


@pytest.fixture(scope="module")
def shell():
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "deepinfer_nb")
    sh.run_line_magic("deepinfer", "up --gateway-port 0")
    sh.run_line_magic(
        "deepinfer", f"deploy smollm2-135m-instruct --name {NAME} --device cpu --wait --timeout 600"
    )
    yield sh
    magics = sh.magics_manager.registry["DeepInferMagics"]
    if magics.cluster is not None:
        sh.run_line_magic("deepinfer", "down")


def magics(sh):
    return sh.magics_manager.registry["DeepInferMagics"]


def test_deploy_wait_reaches_running(shell) -> None:
    table = shell.run_line_magic("deepinfer", "ls")
    assert list(table.df["state"]) == ["Running"]
    dep = shell.run_line_magic("deepinfer", f"status {NAME}")
    assert dep.status == "Running 1/1"
    again = shell.run_line_magic(
        "deepinfer", f"deploy smollm2-135m-instruct --name {NAME} --device cpu"
    )
    assert again.engines[0].id == dep.engines[0].id  # idempotent: same engine


def test_inline_chat_answers_and_keeps_history(shell) -> None:
    shell.run_cell_magic(
        "deepinfer", f"chat {NAME} --new --max-tokens 40", "What is the capital of France?"
    )
    history = magics(shell).handles[NAME].history
    assert history[-1]["role"] == "assistant" and "Paris" in history[-1]["content"]
    shell.run_cell_magic("deepinfer", f"chat {NAME} --max-tokens 20", "And of Italy?")
    assert len(magics(shell).handles[NAME].history) == 4
    shell.run_cell_magic("deepinfer", f"chat {NAME} --new --max-tokens 5", "Hi")
    assert len(magics(shell).handles[NAME].history) == 2


def test_python_api_sync_and_stream(shell) -> None:
    dep = magics(shell).cluster.deployment(NAME)
    result = dep.chat("What is the capital of France?", max_tokens=30, temperature=0.0)
    assert "Paris" in result.text and result.completion_tokens > 0
    stream = dep.chat("Count from 1 to 5.", max_tokens=30, stream=True)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == stream.result.text


def test_interrupt_aborts_the_engine_request(shell) -> None:
    cluster = magics(shell).cluster
    dep = cluster.deployment(NAME)
    engine = dep.engines[0]
    stream = dep.chat("Write a very long story about a dragon.", max_tokens=1500, stream=True)
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(stream):
            if i == 3:
                threading.Timer(0.01, _thread.interrupt_main).start()
                time.sleep(1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = cluster.run(cluster._hosted.metrics(engine))
        if m.running_requests == 0 and m.inflight_rpcs == 0:
            break
        time.sleep(0.2)
    assert m.running_requests == 0 and m.inflight_rpcs == 0


def test_openai_client_through_the_gateway(shell) -> None:
    dep = magics(shell).cluster.deployment(NAME)
    reply = dep.openai_client().chat.completions.create(
        model=dep.model_name,
        max_tokens=30,
        temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in reply.choices[0].message.content
    via = dep.chat("What is the capital of France?", max_tokens=30, temperature=0.0, via="gateway")
    assert "Paris" in via.text


def test_logs_snippet_and_monitor(shell, capsys) -> None:
    shell.run_line_magic("deepinfer", f"logs {NAME} --lines 20")
    assert "==> smol-0-" in capsys.readouterr().out
    code = repr(shell.run_line_magic("deepinfer", f"snippet {NAME}"))
    ns: dict[str, object] = {}
    exec(compile(code.replace("print(", "answer = ("), "<snippet>", "exec"), ns)
    assert "Paris" in str(ns["answer"])
    monitor = shell.run_line_magic("deepinfer", "monitor")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not monitor.metrics:
        time.sleep(0.2)
    assert monitor.metrics, "metrics poll filled nothing in"
    assert "Running" in monitor._repr_mimebundle_()["text/html"]


def test_down_leaves_no_engine_process(shell) -> None:
    dep = magics(shell).cluster.deployment(NAME)
    pids = [e.pid for e in dep.engines if e.state is EngineState.RUNNING]
    assert pids and all(psutil.pid_exists(p) for p in pids)
    shell.run_line_magic("deepinfer", "down")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) for p in pids)
