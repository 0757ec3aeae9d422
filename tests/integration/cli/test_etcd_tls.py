"""etcd's own door, across processes: `deepinfer-nb etcd --tls` makes a CA and certificates and
serves with client-certificate auth; `deepinfer-nb etcd-cert` hands a worker and a gateway their
certificates; both connect with them (the gateway lists the worker's node, read from etcd), while
clients without a certificate, or without TLS, are refused by etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deepinfer_nb.errors import StoreError
from deepinfer_nb.netutil import free_port
from deepinfer_nb.store import keys, open_store

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(180)]

CLI = str(Path(sys.executable).with_name("deepinfer-nb"))


@contextlib.contextmanager
def running(cmd: list[str], *, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM if cmd[1] != "etcd" else signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(check: object, what: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def cert_env(folder: Path, name: str) -> dict[str, str]:
    return {
        "DEEPINFER_STORAGE__ETCD_CA_CERT": str(folder / "ca.pem"),
        "DEEPINFER_STORAGE__ETCD_CERT": str(folder / f"{name}.pem"),
        "DEEPINFER_STORAGE__ETCD_KEY": str(folder / f"{name}-key.pem"),
    }


async def refused(url: str, **opts: str) -> str:
    store = open_store(url, retry_deadline_s=2.0, **opts)
    try:
        with pytest.raises(StoreError) as info:
            await store.get(keys.ROOT + "probe")
        return str(info.value)
    finally:
        await store.close()


def test_tls_etcd_admits_only_certificate_holders(tmp_path: Path) -> None:
    base = {**os.environ, "DEEPINFER_HOME": str(tmp_path / "home")}
    port, gw_port = free_port(), free_port()
    url = f"etcd://127.0.0.1:{port}"
    etcd_cmd = [CLI, "etcd", "--tls", "--port", str(port), "--peer-port", str(free_port())]
    etcd_log = tmp_path / "etcd-cmd.log"
    with running(etcd_cmd, env=base, log=etcd_log):
        wait_for(lambda: "Press Ctrl-C" in etcd_log.read_text(), "etcd --tls", etcd_log)
        text = etcd_log.read_text()
        assert "TLS with client certificates" in text and "DEEPINFER_STORAGE__ETCD_CERT=" in text
        tls = tmp_path / "home" / "etcd-tls"
        assert oct((tls / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
        for name in ("w1", "gw"):
            res = subprocess.run(
                [CLI, "etcd-cert", name, "--out", str(tmp_path / name)],
                env=base,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert res.returncode == 0, res.stderr
            assert "deepinfer-nb worker --store" in res.stderr
        worker_env = {**base, **cert_env(tmp_path / "w1", "w1"), "DEEPINFER_HOME": str(tmp_path)}
        gw_env = {**base, **cert_env(tmp_path / "gw", "gw")}
        worker_cmd = [CLI, "worker", "--store", url, "--node", "w1"]
        gw_cmd = [CLI, "gateway", "--store", url, "--port", str(gw_port)]
        with (
            running(worker_cmd, env=worker_env, log=tmp_path / "worker.log"),
            running(gw_cmd, env=gw_env, log=tmp_path / "gateway.log") as gw,
        ):

            def node_listed() -> bool:
                assert gw.poll() is None, (tmp_path / "gateway.log").read_text()
                try:
                    r = httpx.get(f"http://127.0.0.1:{gw_port}/v1/nodes", timeout=2)
                except httpx.TransportError:
                    return False
                return [n["id"] for n in r.json()["data"]] == ["w1"]

            wait_for(node_listed, "worker w1 seen through the gateway", tmp_path / "worker.log")
            health = httpx.get(f"http://127.0.0.1:{gw_port}/health", timeout=5).json()
            assert health["store"]["connected"]

            ca = str(tmp_path / "gw" / "ca.pem")
            no_cert = asyncio.run(refused(url, etcd_ca_cert=ca))
            no_tls = asyncio.run(refused(url))
            print("without a client certificate:", no_cert)
            print("without TLS:", no_tls)
