"""External signing (the token's way): a certificate or CRL whose signature comes from a digest-signing
function verifies against the key that made it, for P-256 and P-384, and equals in shape what a local
key makes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID

from factory_svc.ca.signer import ExternalSignature, FileSigner, hash_for

NOW = datetime(2026, 6, 1, tzinfo=UTC)
NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])


def _digest_signer(key: ec.EllipticCurvePrivateKey):
    """A stand-in for CKM_ECDSA: signs a digest, answers raw r||s."""
    size = (key.curve.key_size + 7) // 8

    def sign(digest: bytes) -> bytes:
        der = key.sign(digest, ec.ECDSA(utils.Prehashed(hash_for(key))))
        r, s = utils.decode_dss_signature(der)
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    return sign


def _builder(subject_key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(NAME)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        # large enough that the outer lengths need several bytes
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("a" * 60 + f".n{i}") for i in range(8)]), False
        )
    )


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_certificates_and_crls_signed_outside_verify(curve: ec.EllipticCurve) -> None:
    ca_key = ec.generate_private_key(curve)
    external = ExternalSignature(ca_key.public_key(), _digest_signer(ca_key))
    leaf = external.sign_certificate(_builder(ec.generate_private_key(ec.SECP256R1())))
    leaf.verify_directly_issued_by(
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=2))
        .sign(ca_key, hash_for(ca_key))
    )
    local = FileSigner(ca_key).sign_certificate(_builder(ec.generate_private_key(ec.SECP256R1())))
    assert leaf.signature_algorithm_oid == local.signature_algorithm_oid
    assert leaf.signature_hash_algorithm.name == hash_for(ca_key).name

    crl = external.sign_crl(
        x509.CertificateRevocationListBuilder()
        .issuer_name(NAME)
        .last_update(NOW)
        .next_update(NOW + timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(leaf.serial_number).revocation_date(NOW).build()
        )
    )
    assert crl.is_signature_valid(ca_key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    assert x509.load_der_x509_crl(crl.public_bytes(serialization.Encoding.DER)) == crl


def test_other_curves_are_refused() -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    with pytest.raises(ValueError, match="secp521r1 are not supported"):
        ExternalSignature(key.public_key(), _digest_signer(key))
