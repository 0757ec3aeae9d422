"""`deepinfer-nb up` on etcd as a user runs it: stopped after etcd went away, it ends in seconds.

While running, every store call retries for up to 10 s (etcd restarts and leader elections are
ridden out), and the worker retries an engine's record write for 30 s on top. Once stopping, the
drain's writes, the lease revocations and the controller's resignation each give up after one 2 s
retry, so a stop with etcd gone takes seconds, not a minute, and still stops every engine. The
engine here is the fake one (tests/fixtures/fake_engine.py): what is under test is the drain.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from deepinfer_nb.netutil import free_port
from deepinfer_nb.store.local_etcd import LocalEtcd

pytestmark = pytest.mark.etcd


def test_up_stops_promptly_once_etcd_is_gone(tmp_path: Path, fake_python: str) -> None:
    etcd = LocalEtcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    etcd.start()
    port = free_port()
    log = tmp_path / "up.log"
    cmd = [
        sys.executable,
        "-c",
        "from deepinfer_nb.cli import main; raise SystemExit(main())",
        "up",
        "--store",
        etcd.url,
        "--node",
        "stop-test",
        "--gateway-port",
        str(port),
        "--engine-python",
        fake_python,
    ]
    with log.open("wb") as out:
        # the fake engine's FAKE_ENGINE_MODE is no engine tunable: this worker admits it
        env = {**os.environ, "DEEPINFER_AGENT__ALLOWED_ENV": "FAKE_ENGINE_MODE"}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "up did not come up:\n" + log.read_text()
                time.sleep(0.2)
        engine_pid = _start_fake_engine(f"http://127.0.0.1:{port}", proc, log)
        etcd.kill()
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert proc.wait(timeout=90) == 0, log.read_text()
        # about 5 s; a drain retrying its record write as while running would take over 30 s
        assert time.monotonic() - signalled < 20, log.read_text()
        assert not psutil.pid_exists(engine_pid) or (
            psutil.Process(engine_pid).status() == psutil.STATUS_ZOMBIE
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        etcd.stop()
    text = log.read_text()
    assert "worker stopped" in text, text
    assert "stopped; could not record it" in text, text  # the drain went on without etcd
    # every call that found etcd gone gave up after the stop's short retry
    windows = [float(s) for s in re.findall(r"kept failing for ([\d.]+) s", text)]
    assert windows, text
    assert max(windows) <= 2.0, text


def _start_fake_engine(url: str, proc: subprocess.Popen[bytes], log: Path) -> int:
    """Deploy one engine (the fake: it stays Starting) and return its pid once launched."""
    spec = {"name": "e", "model": "m", "device": "cpu", "env": {"FAKE_ENGINE_MODE": "sleep"}}
    assert httpx.post(url + "/v1/deployments", json=spec, timeout=10).status_code == 201
    deadline = time.monotonic() + 60
    while True:
        engines = httpx.get(url + "/v1/engines", timeout=5).json()["data"]
        if engines and engines[0]["pid"] > 0:
            return int(engines[0]["pid"])
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no engine launched:\n" + log.read_text()
        time.sleep(0.2)
