"""`deepinfer-nb up` on etcd as a user runs it: stopped after etcd went away, it ends in seconds.

While running, every store call retries for up to 10 s (etcd restarts and leader elections are
ridden out). Once stopping, the drain's writes, the lease revocations and the controller's
resignation each give up after a 2 s retry, so a stop with etcd gone no longer takes a minute.
"""

from __future__ import annotations

import re
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


def test_up_stops_promptly_once_etcd_is_gone(tmp_path: Path) -> None:
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
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
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
        etcd.kill()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        etcd.stop()
    text = log.read_text()
    assert "worker stopped" in text, text
    # every call that found etcd gone gave up after the stop's short retry
    windows = [float(s) for s in re.findall(r"kept failing for ([\d.]+) s", text)]
    assert windows, text
    assert max(windows) <= 2.0, text
