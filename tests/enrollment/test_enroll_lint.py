"""Preflight lint of a certificate before enrollment: each problem has its own reason (pure, no DPS)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from factory_svc.ca.issuing import open_dev_ca
from factory_svc.enrollment.lint import lint_certificate, lint_policy_from_chain
from provkit.devpki import DevTlsAuthority, key_usage
from provkit.errors import InvalidArgument

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return open_dev_ca(tmp_path_factory.mktemp("ca") / "ca", lambda: NOW)


@pytest.fixture(scope="module")
def policy(ca):
    return lint_policy_from_chain(ca.chain, timedelta(days=30))


def leaf(ca, cn: str, *, days: int = 365, eku: bool = True, is_ca: bool = False, start=NOW) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - timedelta(minutes=1))
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            key_usage(digital_signature=True, key_cert_sign=is_ca),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()), critical=False
        )
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = ca.signer.sign_certificate(builder)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def reason(device_id: str, pem: str, policy, now=NOW) -> str:
    with pytest.raises(InvalidArgument) as caught:
        lint_certificate(device_id, pem, policy, now)
    assert caught.value.field_violations, "a lint failure names the field"
    return caught.value.reason


def test_good_certificate(ca, policy):
    pem = leaf(ca, "dev-1")
    linted = lint_certificate("DEV-1", pem, policy, NOW)
    assert linted.device_id == "dev-1"
    assert len(linted.sha1_thumbprint) == 40 and len(linted.sha256_thumbprint) == 64
    chain = pem + ca.certificate.public_bytes(serialization.Encoding.PEM).decode()
    assert lint_certificate("dev-1", chain, policy, NOW).leaf_pem == pem


def test_each_problem_has_its_reason(ca, policy):
    assert reason("dev-1", leaf(ca, "dev-2"), policy) == "CERTIFICATE_SUBJECT_MISMATCH"
    assert reason("dev-1", leaf(ca, "dev-1", eku=False), policy) == "CERTIFICATE_EKU_MISSING"
    assert reason("dev-1", leaf(ca, "dev-1", is_ca=True), policy) == "CERTIFICATE_IS_CA"
    assert reason("dev-1", leaf(ca, "dev-1", days=10), policy) == "CERTIFICATE_VALIDITY_TOO_SHORT"
    assert reason("dev-1", leaf(ca, "dev-1"), policy, NOW + timedelta(days=400)) == "CERTIFICATE_EXPIRED"
    assert (
        reason("dev-1", leaf(ca, "dev-1", start=NOW + timedelta(days=2)), policy)
        == "CERTIFICATE_NOT_YET_VALID"
    )
    assert reason("dev-1", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", policy) == (
        "CERTIFICATE_MALFORMED"
    )
    assert reason("dev-1", "", policy) == "CERTIFICATE_MISSING"
    assert reason("", leaf(ca, "dev-1"), policy) == "DEVICE_ID_EMPTY"
    assert reason("dev 1", leaf(ca, "dev 1"), policy) == "DEVICE_ID_INVALID_CHARACTERS"
    assert reason("x" * 65, leaf(ca, "dev-1"), policy) == "DEVICE_ID_TOO_LONG"


def test_foreign_ca_is_untrusted(policy):
    stranger = DevTlsAuthority.create("someone else's CA").client_certificate("dev-1")
    # checked at the time the certificate was made: the module's NOW can be minutes older on a busy machine
    now = datetime.now(UTC)
    assert reason("dev-1", stranger.cert_pem.decode(), policy, now) == "CERTIFICATE_UNTRUSTED"
