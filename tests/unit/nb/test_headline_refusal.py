"""The headline command on a CPU-only machine without the hub: `%deepinfer deploy
Qwen/Qwen2.5-7B-Instruct` refuses at once, naming what is wrong, and POST /v1/deployments with
the same body answers 422 with the same text. A real in-kernel cluster (memory store, worker
registered with this machine's real RAM and no GPU, gateway on 127.0.0.1); the hub is a loopback
port nobody listens on, so the check is the same with or without network. No engine starts."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from deepinfer_nb.gpu import probe

MODEL = "Qwen/Qwen2.5-7B-Instruct"


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def shell(tmp_path, monkeypatch) -> Iterator[InteractiveShell]:
    monkeypatch.setenv("DEEPINFER_HOME", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", dead_url())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "deepinfer_nb")
    sh.run_line_magic("config", "DeepInferMagics.worker = True")
    sh.run_line_magic("deepinfer", "up --gateway-port 0 --node vm")
    try:
        yield sh
    finally:
        sh.run_line_magic("deepinfer", "down")
        sh.run_line_magic("unload_ext", "deepinfer_nb")


def test_headline_deploy_refuses_at_once_naming_the_causes(shell: InteractiveShell) -> None:
    devices, _ = probe()
    assert not devices, "this test describes a CPU-only machine"
    started = time.monotonic()
    with pytest.raises(UsageError) as err:
        shell.run_line_magic("deepinfer", f"deploy {MODEL}")
    assert time.monotonic() - started < 5.0
    text = str(err.value)
    assert text.startswith(f"cannot deploy {MODEL}: ")
    assert f"{MODEL} is not cached on node" in text and "is unreachable" in text
    assert f"huggingface-cli download {MODEL}" in text and "HF_ENDPOINT" in text
    # no GPU: named either as the reason (too big for the RAM) or beside the hub's
    assert "no GPU on any node" in text and "so it would run on CPU: needs ~" in text
    assert "estimated from the name: ~7.0B parameters" in text
    cluster = shell.magics_manager.registry["DeepInferMagics"].cluster
    assert MODEL not in [d.spec.model for d in cluster.deployments() if d.spec]

    # the same body over HTTP: 422 with the same causes, nothing written
    url = cluster.gateway_url
    headers = {"Authorization": f"Bearer {cluster.api_key}"} if cluster.api_key else {}
    resp = httpx.post(f"{url}/v1/deployments", json={"model": MODEL}, headers=headers, timeout=10)
    assert resp.status_code == 422, resp.text
    message = resp.json()["error"]["message"]
    assert message.startswith(f"cannot deploy {MODEL}: ")
    assert "is unreachable" in message
    assert "no GPU on any node" in message
    listed = httpx.get(f"{url}/v1/deployments", headers=headers, timeout=10).json()
    assert listed["data"] == []
