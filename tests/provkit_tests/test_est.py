"""EST bodies (RFC 7030 / RFC 8951): what openssl writes we read, what we write openssl reads, and no body
makes the decoders raise anything but EstFormatError."""

from __future__ import annotations

import base64
import contextlib
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from provkit.est import (
    EstFormatError,
    decode_certs_only,
    decode_csr,
    encode_certs_only,
    encode_csr,
)


def _csr(common_name: str = "3f2a9c1e-0000-4000-8000-000000000001") -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


def _certificate(common_name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_a_request_round_trips_and_line_breaks_or_pem_do_not_matter() -> None:
    csr = _csr()
    body = encode_csr(csr)
    assert all(len(line) <= 64 for line in body.splitlines())
    assert decode_csr(body) == csr
    assert decode_csr(body.replace(b"\n", b"\r\n  ")) == csr
    assert decode_csr(csr.public_bytes(serialization.Encoding.PEM)) == csr


def test_openssl_s_request_is_read_and_our_answer_is_read_by_openssl(tmp_path) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    der = subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=dev-1", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    csr = decode_csr(base64.encodebytes(der))
    assert csr.subject.rfc4514_string() == "CN=dev-1" and csr.is_signature_valid

    chain = [_certificate("dev-1"), _certificate("Factory CA")]
    (tmp_path / "answer.p7").write_bytes(base64.b64decode(encode_certs_only(chain)))
    printed = subprocess.run(
        ["openssl", "pkcs7", "-inform", "DER", "-in", str(tmp_path / "answer.p7"), "-print_certs"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "subject=CN = dev-1" in printed and "subject=CN = Factory CA" in printed
    assert decode_certs_only(encode_certs_only(chain)) == chain


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "empty"),
        (b"not base64 at all!", "not base64"),
        (base64.b64encode(b"\x30\x03\x02\x01\x00"), "not a PKCS#10"),
        (b"A" * 70_000, "bytes"),
    ],
)
def test_a_bad_request_body_says_what_is_wrong(body: bytes, says: str) -> None:
    with pytest.raises(EstFormatError, match=says):
        decode_csr(body)


@given(st.binary(max_size=600) | st.binary(max_size=600).map(base64.b64encode))
def test_no_body_raises_anything_but_a_format_error(body: bytes) -> None:
    for decode in (decode_csr, decode_certs_only):
        with contextlib.suppress(EstFormatError):
            decode(body)
