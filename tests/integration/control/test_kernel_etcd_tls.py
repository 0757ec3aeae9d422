"""A notebook (`deepinfer_nb.connect()`) on an etcd that requires TLS with client certificates uses
the [storage] TLS settings (here from DEEPINFER_STORAGE__ETCD_* variables, as a kernel reads them).

The etcd server is Debian's binary, started with certificates made in the test (a CA, a server
certificate for 127.0.0.1, a client certificate); it refuses clients without one. Before the
composition root passed the store options, the kernel opened etcd without them and failed.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import deepinfer_nb
from deepinfer_nb.errors import StoreError
from deepinfer_nb.models import DeploymentSpec, decode
from deepinfer_nb.netutil import free_port
from deepinfer_nb.store import keys, open_store
from deepinfer_nb.store.local_etcd import find_etcd_binary

pytestmark = pytest.mark.etcd


def _key_and_name(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    return ec.generate_private_key(ec.SECP256R1()), x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_certificates(root: Path) -> None:
    """ca.pem, server.pem/.key (for 127.0.0.1), client.pem/.key under `root`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, ca_name = _key_and_name("deepinfer test CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(root / "ca", ca_key, ca)
    for who, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key, name = _key_and_name(f"deepinfer {who}")
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(root / who, key, cert)


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An etcd on loopback that requires client certificates: (store URL, certificate dir)."""
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    port, peer = free_port(), f"http://127.0.0.1:{free_port()}"
    log = (tmp_path / "etcd.log").open("wb")
    proc = subprocess.Popen(
        [
            find_etcd_binary(),
            "--data-dir",
            str(tmp_path / "data"),
            "--listen-client-urls",
            f"https://127.0.0.1:{port}",
            "--advertise-client-urls",
            f"https://127.0.0.1:{port}",
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"default={peer}",
            "--cert-file",
            str(certs / "server.pem"),
            "--key-file",
            str(certs / "server.key"),
            "--trusted-ca-file",
            str(certs / "ca.pem"),
            "--client-cert-auth",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"etcd://127.0.0.1:{port}", certs
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_connect_uses_the_etcd_tls_settings(
    tls_etcd: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, certs = tls_etcd
    tls = {
        "etcd_ca_cert": str(certs / "ca.pem"),
        "etcd_cert": str(certs / "client.pem"),
        "etcd_key": str(certs / "client.key"),
    }
    # The server refuses a client without the certificates (so the settings are what matters).
    with pytest.raises(StoreError):
        asyncio.run(_put_plain(url))
    for name, value in tls.items():
        monkeypatch.setenv(f"DEEPINFER_STORAGE__{name.upper()}", value)

    cluster = deepinfer_nb.connect(url, worker=False, gateway_port=None, timeout=60)
    try:
        cluster.deploy("m", name="tls", device="cpu")
        spec = asyncio.run(_read_spec(url, tls))
        assert spec.model == "m"
    finally:
        cluster.shutdown(timeout=60)


async def _put_plain(url: str) -> None:
    store = open_store(url, retry_deadline_s=1.0)
    try:
        await store.put("/plain", b"x")
    finally:
        await store.close()


async def _read_spec(url: str, tls: dict[str, str]) -> DeploymentSpec:
    """The deployment as another TLS client of the same etcd sees it."""
    store = open_store(url, retry_deadline_s=10.0, **tls)
    try:
        kv = await store.get(keys.deployment("tls"))
        assert kv is not None, "the kernel's deployment is not in the TLS etcd"
        return decode(DeploymentSpec, kv.key, kv.value)
    finally:
        await store.close()
