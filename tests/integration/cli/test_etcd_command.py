"""`deepinfer-nb etcd`: starts a real etcd on loopback that a store can use; Ctrl-C stops it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepinfer_nb.netutil import free_port
from deepinfer_nb.store import open_store

# Only the etcd subcommand is registered, so this test does not depend on the other commands.
RUN = (
    "import argparse, sys\n"
    "from deepinfer_nb.cli import etcd\n"
    "from deepinfer_nb.errors import DeepInferError\n"
    "p = argparse.ArgumentParser(); etcd.register(p.add_subparsers())\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "try:\n    sys.exit(a.func(a))\n"
    "except DeepInferError as e:\n    print(e, file=sys.stderr); sys.exit(1)\n"
)


@pytest.mark.etcd
async def test_etcd_command_serves_until_interrupted(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DEEPINFER_HOME": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-c", RUN, "etcd", "--port", str(port), "--peer-port", str(free_port())],
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        store = open_store(f"etcd://127.0.0.1:{port}", retry_deadline_s=15)
        await store.put("/cli/k", b"v")
        kv = await store.get("/cli/k")
        assert kv is not None and kv.value == b"v"
        await store.close()
        assert (tmp_path / "etcd" / "member").is_dir()  # data under DEEPINFER_HOME/etcd
    finally:
        proc.send_signal(signal.SIGINT)
        _, raw = await asyncio.wait_for(proc.communicate(), 15)
    err = raw.decode()
    assert proc.returncode == 0, err
    assert f"etcd://127.0.0.1:{port}" in err


def test_etcd_command_without_binary_explains(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "DEEPINFER_HOME": str(tmp_path)}
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", RUN, "etcd"], env=env, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 1
    assert "apt-get install etcd-server" in res.stderr
    assert time.monotonic() - started < 30
