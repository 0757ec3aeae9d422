"""Certificates for etcd with TLS and client-certificate authentication, made on this machine.

    tls = certs.ensure_server(home / "etcd-tls", hosts=["10.0.0.5"])  # CA + server cert, once
    bundle = certs.issue_client(home / "etcd-tls", "gpu-host-1")     # one per worker/gateway

A private CA (`ca.pem`, its key `ca-key.pem` readable by the owner only) signs one server
certificate (`server.pem`; its names: loopback, this host's names and any `hosts` given; it also
serves as the etcd helper's own client certificate for its health probe) and one client certificate
per component (`clients/NAME.pem` + `NAME-key.pem`, CN = NAME). etcd, started with
`--client-cert-auth --trusted-ca-file ca.pem`, then accepts only clients holding a certificate
this CA signed. Keys are EC P-256; certificates are valid for ten years.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError

VALID_DAYS = 3650


@dataclasses.dataclass(frozen=True)
class CertFiles:
    """A CA certificate with a certificate and key signed by it: what a TLS party presents."""

    ca: Path
    cert: Path
    key: Path

    def storage_env(self) -> dict[str, str]:
        """The settings that make a deepinfer-nb component connect to etcd with these files."""
        return {
            "DEEPINFER_STORAGE__ETCD_CA_CERT": str(self.ca),
            "DEEPINFER_STORAGE__ETCD_CERT": str(self.cert),
            "DEEPINFER_STORAGE__ETCD_KEY": str(self.key),
        }


def ensure_server(directory: Path, *, hosts: Iterable[str] = ()) -> CertFiles:
    """The CA and the server certificate under `directory`, made if missing (or if `hosts`
    names one the existing server certificate lacks)."""
    ca_cert, ca_key = _ensure_ca(directory)
    names = _server_names(hosts)
    cert, key = directory / "server.pem", directory / "server-key.pem"
    if not (cert.exists() and key.exists() and names <= _names_of(cert)):
        _issue(ca_cert, ca_key, cn="deepinfer-etcd", names=names, out=(cert, key))
    return CertFiles(directory / "ca.pem", cert, key)


def issue_client(directory: Path, name: str, *, out: Path | None = None) -> CertFiles:
    """A client certificate for component `name` (CN), signed by the CA in `directory`; written
    with a copy of the CA certificate into `out` (default `directory/clients`)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,63}", name):
        raise ConfigError(f"client name {name!r}: use letters, digits, '.', '_', '-'")
    if not (directory / "ca.pem").exists():
        raise ConfigError(
            f"no etcd CA in {directory}: start etcd with TLS first (deepinfer-nb etcd --tls)"
        )
    ca_cert, ca_key = _load_ca(directory)
    target = out or directory / "clients"
    target.mkdir(parents=True, exist_ok=True)
    cert, key = target / f"{name}.pem", target / f"{name}-key.pem"
    _issue(ca_cert, ca_key, cn=name, names=set(), out=(cert, key))
    ca_copy = target / "ca.pem"
    if ca_copy != directory / "ca.pem":
        ca_copy.write_bytes((directory / "ca.pem").read_bytes())
    return CertFiles(ca_copy, cert, key)


# ---- internals ----------------------------------------------------------------------------------


def _server_names(hosts: Iterable[str]) -> set[str]:
    names = {"127.0.0.1", "::1", "localhost", socket.gethostname(), socket.getfqdn()}
    return {n for n in (*names, *hosts) if n and n not in ("0.0.0.0", "::")}


def _ensure_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if (directory / "ca.pem").exists() and (directory / "ca-key.pem").exists():
        return _load_ca(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deepinfer-nb etcd CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(directory / "ca.pem", directory / "ca-key.pem", cert, key)
    return cert, key


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = load_pem_private_key((directory / "ca-key.pem").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{directory / 'ca-key.pem'} is not the EC key this helper makes")
    return cert, key


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    cn: str,
    names: set[str],
    out: tuple[Path, Path],
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if names:  # a server certificate; it doubles as the helper's own client certificate
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in sorted(names)]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(*out, cert, key)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _names_of(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return ips | set(san.get_values_for_type(x509.DNSName))


def _write(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem_key)
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
