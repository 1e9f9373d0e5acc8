"""A tiny development PKI for the services' own TLS (server certificates, operator client certificates).

For demos, local development and tests: one self-signed CA, server certificates (serverAuth, SANs) and
client certificates (clientAuth).  Production deployments bring certificates from their own PKI.

API
---
``DevTlsAuthority.create(common_name="devprov development TLS CA", *, now=None) -> DevTlsAuthority``
``DevTlsAuthority.load(cert_pem, key_pem, *, now=None) -> DevTlsAuthority``   an authority written before
``.ca_pem: bytes``, ``.key_pem: bytes``, ``.write(cert_path, key_path)``
``.server_certificate(names: Sequence[str]) -> TlsPair``     DNS names and/or IP addresses as SANs
``.client_certificate(common_name: str, uris=(), *, days=825) -> TlsPair``
                                   ``uris``: SAN URIs, e.g. ``urn:devprov:oem:acme`` (provkit.parties)
``TlsPair(cert_pem, key_pem)``; ``.write(cert_path, key_path)`` writes the key 0600.
``write_private_file(path, data: bytes)``   create/replace a file with mode 0600 (atomic rename).
``key_usage(*, digital_signature=False, key_cert_sign=False, crl_sign=False) -> x509.KeyUsage``
    the KeyUsage extension by name (every other bit off); ``CA_KEY_USAGE``, ``SIGNATURE_KEY_USAGE``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from litestore import private_directory


def key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


CA_KEY_USAGE = key_usage(key_cert_sign=True, crl_sign=True)
SIGNATURE_KEY_USAGE = key_usage(digital_signature=True)


def write_private_file(path: Path, data: bytes) -> None:
    private_directory(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class TlsPair:
    cert_pem: bytes
    key_pem: bytes

    def write(self, cert_path: Path, key_path: Path) -> None:
        private_directory(cert_path.parent)
        cert_path.write_bytes(self.cert_pem)
        write_private_file(key_path, self.key_pem)

    def __repr__(self) -> str:
        return "TlsPair(<certificate>, <key>)"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True)
class DevTlsAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    now: datetime

    @classmethod
    def create(
        cls, common_name: str = "devprov development TLS CA", *, now: datetime | None = None
    ) -> DevTlsAuthority:
        now = now or datetime.now(UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                CA_KEY_USAGE,
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, now)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes, *, now: datetime | None = None) -> DevTlsAuthority:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise ValueError("the CA key is not the EC key of the CA certificate")
        return cls(cert, key, now or datetime.now(UTC))

    @property
    def ca_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def write(self, cert_path: Path, key_path: Path) -> None:
        TlsPair(self.ca_pem, self.key_pem).write(cert_path, key_path)

    def _leaf(
        self,
        common_name: str,
        names: Sequence[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        days: int = 825,
    ) -> TlsPair:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - timedelta(minutes=5))
            .not_valid_after(self.now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                SIGNATURE_KEY_USAGE,
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(list(names)), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return TlsPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def server_certificate(self, names: Sequence[str]) -> TlsPair:
        if not names:
            raise ValueError("a server certificate needs at least one name")
        return self._leaf(names[0], [_san(n) for n in names], ExtendedKeyUsageOID.SERVER_AUTH)

    def client_certificate(self, common_name: str, uris: Sequence[str] = (), *, days: int = 825) -> TlsPair:
        sans = [x509.UniformResourceIdentifier(u) for u in uris]
        return self._leaf(common_name, sans, ExtendedKeyUsageOID.CLIENT_AUTH, days)
