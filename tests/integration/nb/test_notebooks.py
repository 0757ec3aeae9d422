"""The notebooks executed end to end with nbclient in a real kernel, with assertions on their
outputs, and no engine process left afterwards. Also the kernel lifecycle: a killed kernel's
engine does not survive the grace period."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

from deepinfer_nb.config import home_dir

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[3]
GRACE_S = 45.0


@pytest.fixture
def deepinfer_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh home per notebook (state, logs, etcd data) that shares the built model."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(home_dir() / "models")
    monkeypatch.setenv("DEEPINFER_HOME", str(home))
    return home


def engine_processes(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "deepinfer_nb.engine" in " ".join(proc.info["cmdline"] or []) and (
                proc.environ().get("DEEPINFER_HOME") == str(home)
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_gone(home: Path, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := engine_processes(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def outputs_text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            parts.append(out["text"])
        for mime in ("text/plain", "text/markdown", "text/html"):
            parts.append(str(out.get("data", {}).get(mime, "")))
    return "\n".join(parts)


def execute(name: str, tmp_path: Path) -> tuple[list[str], list[str]]:
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    (tmp_path / name).write_text(nbformat.writes(nb))  # the executed copy, for inspection
    return [c.source for c in nb.cells], [outputs_text(c) for c in nb.cells]


def cell_output(sources: list[str], outputs: list[str], text: str) -> str:
    """The output of the first cell whose source contains `text`."""
    return next(o for s, o in zip(sources, outputs, strict=True) if text in s)


def test_quickstart_notebook(deepinfer_home: Path, tmp_path: Path) -> None:
    sources, outputs = execute("quickstart.ipynb", tmp_path)
    assert "Paris" in cell_output(sources, outputs, "%%deepinfer chat")
    openai_out = cell_output(sources, outputs, "deepinfer_nb.connect()")
    assert "openai:" in openai_out and "Paris" in openai_out
    assert "Paris" in cell_output(sources, outputs, '"smollm2-135m-instruct-gguf"')  # llama.cpp
    langchain_out = cell_output(sources, outputs, "with_structured_output")
    assert "langchain: country=" in langchain_out and "capital=" in langchain_out
    assert "Running" in cell_output(sources, outputs, "%deepinfer ls")
    assert "Running" in cell_output(sources, outputs, "%deepinfer monitor")
    assert "curl -s http://127.0.0.1:" in cell_output(sources, outputs, "%deepinfer snippet")
    assert not wait_gone(deepinfer_home, 10)


def test_binder_notebook(deepinfer_home: Path, tmp_path: Path) -> None:
    """The 2 GiB Binder tour: the GGUF on llama.cpp only (seconds, so cheap to run here)."""
    sources, outputs = execute("binder.ipynb", tmp_path)
    assert "Paris" in cell_output(sources, outputs, "%%deepinfer chat")
    openai_out = cell_output(sources, outputs, "client = deepinfer_nb.connect()")
    assert "openai:" in openai_out and "Paris" in openai_out
    # no notebook server in front of nbclient's kernel: every audience is on loopback
    gateway = cell_output(sources, outputs, "%deepinfer gateway")
    assert "OpenAI base URL for external clients: http://127.0.0.1:" in gateway
    assert "from openai import OpenAI" in cell_output(sources, outputs, "%deepinfer snippet")
    assert "Running" in cell_output(sources, outputs, "%deepinfer monitor")
    assert not wait_gone(deepinfer_home, 10)


def test_cluster_notebook(deepinfer_home: Path, tmp_path: Path) -> None:
    sources, outputs = execute("cluster.ipynb", tmp_path)
    assert "worker-2" in cell_output(sources, outputs, 'deepinfer_nb.connect("etcd")')
    table = cell_output(sources, outputs, "%deepinfer ls")
    assert table.count("Running") >= 2 and "worker-2" in table
    assert "Paris" in cell_output(sources, outputs, "%%deepinfer chat")
    assert "worker exit code: 0" in cell_output(sources, outputs, "worker.terminate")
    assert not wait_gone(deepinfer_home, 10)


def test_killed_kernel_leaves_no_engine(deepinfer_home: Path) -> None:
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        for code in (
            "%load_ext deepinfer_nb",
            "%deepinfer up --gateway-port 0",
            "%deepinfer deploy smollm2-135m-instruct --name k --device cpu --wait",
        ):
            reply = kc.execute_interactive(code, timeout=600)
            assert reply["content"]["status"] == "ok", reply["content"]
        engines = engine_processes(deepinfer_home)
        assert engines, "no engine process started"
        os.kill(km.provisioner.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert not wait_gone(deepinfer_home, GRACE_S), "an engine outlived its killed kernel"
