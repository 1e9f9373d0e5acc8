"""Test helper: a tiny CA that signs device certificates (for the tests that need no factory)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_client.identity import PrivateKey, generate_key, key_to_pem


class TinyCa:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test device CA")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        cn: str,
        key: PrivateKey,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        crl_urls: tuple[str, ...] = (),
    ) -> bytes:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(minutes=5))
            .not_valid_after(not_after or now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if crl_urls:  # as the factory names its CRL (CRL Distribution Points, one full name each)
            points = [
                x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)
                for url in crl_urls
            ]
            builder = builder.add_extension(x509.CRLDistributionPoints(points), critical=False)
        leaf = builder.sign(self.key, hashes.SHA256())
        return leaf.public_bytes(serialization.Encoding.PEM) + self.cert.public_bytes(
            serialization.Encoding.PEM
        )


def make_identity(ca: TinyCa, guid: str, **validity: datetime) -> tuple[bytes, bytes]:
    key = generate_key()
    return key_to_pem(key), ca.issue(guid, key, **validity)


def make_crl(
    ca: TinyCa,
    revoked: dict[int, x509.ReasonFlags | None],
    *,
    signed_by: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """A DER CRL in ``ca``'s name listing ``revoked`` (serial -> reason), signed by it (or ``signed_by``)."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=7))
        .add_extension(x509.CRLNumber(7), critical=False)
    )
    for serial, reason in revoked.items():
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(signed_by or ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
