"""`run_until_signalled`: a SIGTERM that comes while a command is still starting (before
`serve_until_signalled` has its handlers) stops it as cleanly as a later one: what the command
started is stopped (its `finally` runs) and the exit code is 0. SIGINT keeps exit 130.

Each case runs in a fresh interpreter that signals itself half-way through its start.
"""

from __future__ import annotations

import subprocess
import sys

COMMAND = """
import asyncio, os, signal, sys
from deepinfer_nb.services import run_until_signalled

signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell hands down SIG_IGN

async def starting():
    try:
        os.kill(os.getpid(), signal.{sig})
        await asyncio.sleep(30)  # e.g. waiting for an etcd server's health
    finally:
        print("what was started is stopped", flush=True)
    return 3

try:
    code = run_until_signalled(starting())
except KeyboardInterrupt:
    code = 130
raise SystemExit(code)
"""


def _run(sig: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", COMMAND.format(sig=sig)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sigterm_while_starting_stops_what_was_started_and_exits_zero() -> None:
    done = _run("SIGTERM")
    assert done.returncode == 0, done.stderr
    assert "what was started is stopped" in done.stdout
    assert "stopped while starting (SIGTERM)" in done.stderr


def test_sigint_while_starting_still_exits_130() -> None:
    done = _run("SIGINT")
    assert done.returncode == 130, done.stderr
    assert "what was started is stopped" in done.stdout
