"""`deepinfer-nb gateway` as a user runs it: a real process on loopback, key from the env."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from deepinfer_nb.netutil import free_port


def test_gateway_command_serves_with_api_key() -> None:
    port = free_port()
    env = {**os.environ, "GW_TEST_KEY": "k1,k2"}
    cmd = [
        sys.executable,
        "-c",
        "from deepinfer_nb.cli import main; raise SystemExit(main())",
        "gateway",
        "--store",
        "memory://",
        "--port",
        str(port),
        "--api-key-env",
        "GW_TEST_KEY",
    ]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "gateway did not come up"
                time.sleep(0.2)
        assert health.json()["status"] == "healthy"
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k2"})
        assert r.status_code == 200 and r.json() == {"object": "list", "data": []}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)  # drains and closes the pipe
    assert proc.returncode == 0, err  # SIGTERM is a clean stop


def test_gateway_command_refuses_public_bind_without_key() -> None:
    cmd = [
        sys.executable,
        "-c",
        "from deepinfer_nb.cli import main; raise SystemExit(main())",
        "gateway",
        "--store",
        "memory://",
        "--host",
        "0.0.0.0",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "--api-key-env" in out.stderr and "0.0.0.0" in out.stderr
