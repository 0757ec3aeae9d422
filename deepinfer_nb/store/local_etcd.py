"""Run a single-member etcd server as a child process: `deepinfer-nb etcd`, the notebook layer
and the test fixtures share this.

`LocalEtcd` starts Debian's `etcd` binary (package etcd-server) on a client port with a data dir,
waits until `/health` answers, and can be killed (SIGKILL, for crash tests) and started again on
the same data dir and ports: etcd keeps its revisions and leases across the restart. By default
the server dies with the process (strictly: the thread) that started it, even when that is
SIGKILLed (`procenv.die_with_parent`), so no orphaned etcd keeps the port and the data dir. With
`tls` (files from `store.certs`) it serves HTTPS/gRPC-TLS only and requires a client certificate
signed by the CA (`--client-cert-auth`); its own health probe presents the server certificate.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .. import procenv
from ..errors import StoreError, StoreUnavailableError
from ..netutil import free_port

if TYPE_CHECKING:
    from .certs import CertFiles

INSTALL_HINT = "install it with `apt-get install etcd-server` (Debian/Ubuntu) or from etcd.io"


def find_etcd_binary() -> str:
    """The `etcd` executable on PATH, or a StoreError saying how to get it."""
    path = shutil.which("etcd")
    if path is None:
        raise StoreError(f"the etcd server binary was not found on PATH: {INSTALL_HINT}")
    return path


class LocalEtcd:
    """One etcd member on `host:port`, data in `data_dir`; peer traffic stays on loopback."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        peer_port: int = 0,
        log_path: str | Path | None = None,
        name: str = "deepinfer",
        die_with_parent: bool = True,
        tls: CertFiles | None = None,
    ) -> None:
        self.binary = find_etcd_binary()
        self.tls = tls
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port()
        self.peer_port = peer_port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.name = name
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def advertise_host(self) -> str:
        # A wildcard listen address is not a place clients can dial: advertise this host's name.
        return socket.getfqdn() if self.host in ("0.0.0.0", "::") else self.host

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.advertise_host}:{self.port}"

    @property
    def url(self) -> str:
        """The store URL for `open_store`."""
        return f"etcd://{self.advertise_host}:{self.port}"

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            f"{self.scheme}://{self.host}:{self.port}",
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{self.name}={peer}",
            "--initial-cluster-state",
            "new",
            *self._tls_flags(),
        ]

    def _tls_flags(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            "--cert-file",
            str(self.tls.cert),
            "--key-file",
            str(self.tls.key),
            "--trusted-ca-file",
            str(self.tls.ca),
            "--client-cert-auth",
        ]

    def start(self, *, timeout: float = 15.0) -> None:
        """Start the process and wait until it reports healthy (or raise, naming the log)."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab")
        cmd = self.command()
        self.process = subprocess.Popen(
            procenv.die_with_parent(cmd) if self.die_with_parent else cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log else subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in a notebook or terminal must not reach it
        )
        self.wait_healthy(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        probe = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.cert), str(self.tls.key))
        url = f"{self.scheme}://{probe}:{self.port}/health"
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def wait_healthy(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StoreUnavailableError(
                    f"etcd exited with status {self.process.returncode} while starting on "
                    f"{self.host}:{self.port}{self._log_hint()}"
                )
            if self.healthy():
                return
            time.sleep(0.05)
        raise StoreUnavailableError(
            f"etcd on {self.host}:{self.port} not healthy after {timeout:.0f} s{self._log_hint()}"
        )

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed beyond what etcd already synced."""
        self._signal(signal.SIGKILL, wait=5.0)

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if not self._signal(signal.SIGTERM, wait=grace):
            self.kill()

    def restart(self, *, timeout: float = 15.0) -> None:
        """Start again on the same data dir and ports (after `kill` or `stop`)."""
        if self.running:
            self.kill()
        self.start(timeout=timeout)

    def _signal(self, sig: signal.Signals, *, wait: float) -> bool:
        proc = self.process
        if proc is None or proc.poll() is not None:
            self._close_log()
            return True
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return False
        self._close_log()
        return True

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path else ""

    def __enter__(self) -> LocalEtcd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
