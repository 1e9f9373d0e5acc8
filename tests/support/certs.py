"""The tests' one certificate authority, made on the spot (the factory's own CA is tested as the product):

    ca = TestCa()
    cert = ca.issue(tmp_path, "dev-1")              # files (the device SDK's X509 takes paths): DeviceCert
    cert = ca.issue(tmp_path, "dev-1", self_signed=True)
    key_pem, chain_pem = ca.identity(guid)          # a device identity as the factory hands it out
    chain_pem = ca.chain_pem("dev-1", key, crl_urls=(url,))
    crl_der = ca.crl({serial: x509.ReasonFlags.key_compromise})
    pki = ca.server(tmp_path, ["127.0.0.2"])         # a TLS server certificate and key, the CA beside them

Device leaves carry CN = registration id, EKU clientAuth and no CA flag, as DPS expects them.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM without a passphrase (as the device's state directory keeps it)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


@dataclass(frozen=True)
class DeviceCert:
    registration_id: str
    cert_path: Path
    key_path: Path
    certificate: x509.Certificate

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def sha1(self) -> str:
        return self.certificate.fingerprint(hashes.SHA1()).hex().upper()

    @property
    def sha256(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex().upper()


@dataclass(frozen=True)
class ServerPki:
    ca_pem: str
    ca_path: Path
    cert_path: Path
    key_path: Path


class TestCa:
    __test__ = False

    def __init__(self, common_name: str = "test device CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(common_name)
        now = datetime.now(UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def leaf(
        self,
        common_name: str,
        key: ec.EllipticCurvePrivateKey,
        *,
        not_before: datetime,
        not_after: datetime,
        self_signed: bool = False,
        crl_urls: Iterable[str] = (),
        server_hosts: Iterable[str] | None = None,
    ) -> x509.Certificate:
        """A device certificate for ``key`` (a TLS server's with ``server_hosts``), signed by this CA or by
        ``key`` itself."""
        subject = _name(common_name)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if server_hosts is None else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if self_signed else self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if not self_signed:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        if server_hosts is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(_sans(server_hosts)), critical=False)
        urls = list(crl_urls)
        if urls:  # as the factory names its CRL (CRL Distribution Points, one full name each)
            names = [[x509.UniformResourceIdentifier(url)] for url in urls]
            points = [x509.DistributionPoint(name, None, None, None) for name in names]
            builder = builder.add_extension(x509.CRLDistributionPoints(points), critical=False)
        return builder.sign(key if self_signed else self.key, hashes.SHA256())

    def issue(
        self,
        directory: Path,
        registration_id: str,
        *,
        common_name: str | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        self_signed: bool = False,
    ) -> DeviceCert:
        """A new key and its certificate written to ``directory`` (the key 0600)."""
        now = datetime.now(UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.leaf(
            common_name or registration_id,
            key,
            not_before=not_before or now - timedelta(hours=1),
            not_after=not_after or now + timedelta(days=10),
            self_signed=self_signed,
        )
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"{registration_id}-{cert.serial_number:x}"[:60]
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(key_path, key_pem(key))
        return DeviceCert(registration_id, cert_path, key_path, cert)

    def chain_pem(
        self,
        common_name: str,
        key: ec.EllipticCurvePrivateKey,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        crl_urls: Iterable[str] = (),
    ) -> bytes:
        """The certificate for ``key`` followed by this CA's, in PEM (what the factory returns)."""
        now = datetime.now(UTC)
        cert = self.leaf(
            common_name,
            key,
            not_before=not_before or now - timedelta(minutes=5),
            not_after=not_after or now + timedelta(days=30),
            crl_urls=crl_urls,
        )
        return cert.public_bytes(serialization.Encoding.PEM) + self.pem

    def identity(self, guid: str, **validity: datetime) -> tuple[bytes, bytes]:
        """A device identity as a state directory holds it: (key PEM, chain PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        return key_pem(key), self.chain_pem(guid, key, **validity)

    def crl(
        self,
        revoked: Mapping[int, x509.ReasonFlags | None],
        *,
        signed_by: ec.EllipticCurvePrivateKey | None = None,
    ) -> bytes:
        """A DER CRL in this CA's name listing ``revoked`` (serial -> reason), signed by it (or by
        ``signed_by``)."""
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.name)
            .last_update(now)
            .next_update(now + timedelta(days=7))
            .add_extension(x509.CRLNumber(7), critical=False)
        )
        for serial, reason in revoked.items():
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
            if reason is not None:
                entry = entry.add_extension(x509.CRLReason(reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(signed_by or self.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def server(self, directory: Path, hosts: Iterable[str]) -> ServerPki:
        """A TLS server certificate for ``hosts`` (and localhost) in ``directory``: ca.pem, server.pem,
        server.key."""
        now = datetime.now(UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.leaf(
            "test server",
            key,
            not_before=now - timedelta(minutes=5),
            not_after=now + timedelta(days=1),
            server_hosts=hosts,
        )
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.pem").write_bytes(self.pem)
        (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(directory / "server.key", key_pem(key))
        paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
        return ServerPki(self.pem.decode(), *paths)


def _sans(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names
