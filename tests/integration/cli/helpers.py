"""Running the real `deepinfer-nb` executable in tests: the path, a server started in its own
process group (waited for until /health answers), and its stop (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

EXE = str(Path(sys.executable).parent / "deepinfer-nb")


def start(
    args: list[str], *, url: str, log: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.Popen[bytes]:
    """`deepinfer-nb ARGS` in its own session, returned once `url`/health answers."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [EXE, *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise AssertionError("the server did not come up:\n" + log.read_text())
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes], *, grace: float = 90) -> int:
    """SIGTERM the process group, SIGKILL it after `grace` seconds; the exit code."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=10)
