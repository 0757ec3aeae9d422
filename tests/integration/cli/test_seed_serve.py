"""`deepinfer-nb serve -c` on the original deepinfer's configs/default.toml (tests/data/seed):
its endpoint pointed at this test's own local etcd, its public bind (0.0.0.0) guarded by an API
key. It starts, says how it read the original key names, and serves the original curl body."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deepinfer_nb.netutil import free_port
from deepinfer_nb.store.local_etcd import LocalEtcd

pytestmark = pytest.mark.etcd

SEED = Path(__file__).parents[2] / "data" / "seed"
EXE = str(Path(sys.executable).parent / "deepinfer-nb")
KEY = "seed-test-key"


def test_serve_runs_on_the_original_config(tmp_path: Path, etcd_server: LocalEtcd) -> None:
    endpoint = etcd_server.url.removeprefix("etcd://")
    text = (SEED / "default.toml").read_text()
    assert 'etcd_endpoints = ["127.0.0.1:2379"]' in text
    config = tmp_path / "default.toml"
    config.write_text(text.replace("127.0.0.1:2379", endpoint))
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "SEED_API_KEY": KEY}
    cmd = [EXE, "serve", "-c", str(config), "--gateway-port", str(port)]
    cmd += ["--api-key-env", "SEED_API_KEY"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert health.json()["store"]["url"] == etcd_server.url  # the test's etcd, no other
        assert httpx.get(url + "/v1/deployments", timeout=5).status_code == 401
        body = json.loads((SEED / "deploy_body.json").read_text())
        created = httpx.post(url + "/v1/deployments", json=body, headers=auth, timeout=10)
        assert created.status_code == 201, created.text
        name = created.json()["name"]
        view = httpx.get(f"{url}/v1/deployments/{name}", headers=auth, timeout=5).json()
        assert (view["model"], view["device"], view["tensor_parallel_size"]) == (
            body["model"],
            "cuda:0",
            1,
        )
        assert view["gpu_memory_utilization"] == 0.9
        gone = httpx.delete(f"{url}/v1/deployments/{name}", headers=auth, timeout=10)
        assert gone.status_code == 200
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    output = log.read_text()
    assert code == 0, output
    notes = [line for line in output.splitlines() if line.startswith("deepinfer-nb: note:")]
    assert len(notes) == 6 and any("etcd_endpoints" in n for n in notes), output
