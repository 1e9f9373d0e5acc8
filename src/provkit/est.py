"""EST (RFC 7030) on the wire, both sides: what a renewal request and its answer look like in bytes.

Enrollment over Secure Transport is the standard way for a device to renew its certificate over HTTPS,
authenticated by the certificate it holds.  The two operations this suite serves, under ``/.well-known/est/``:

``GET  cacerts``          -> the CA certificates (``application/pkcs7-mime``, a certs-only PKCS#7, base64)
``POST simplereenroll``   PKCS#10 in (``application/pkcs10``, base64 of the DER) -> the new certificate
                          (``application/pkcs7-mime; smime-type=certs-only``, base64)

Bodies are base64 of DER, as RFC 8951 settles for RFC 7030's "Content-Transfer-Encoding: base64": line
breaks and other whitespace in it are ignored; a body that is PEM (``-----BEGIN CERTIFICATE REQUEST-----``)
is taken too, since it is the same bytes with a header.

API
---
``decode_csr(body) -> CertificateSigningRequest``         raises :class:`EstFormatError`
``encode_csr(csr) -> bytes``                              the request body
``encode_certs_only(certificates) -> bytes``              a response body (lines of 64 characters)
``decode_certs_only(body) -> list[Certificate]``          raises :class:`EstFormatError`
``CSR_TYPE``, ``CERTS_ONLY_TYPE``, ``CACERTS_TYPE``        content types
``CACERTS_PATH``, ``SIMPLEREENROLL_PATH``                 the operations' paths
"""

from __future__ import annotations

import base64
import binascii
import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

WELL_KNOWN = "/.well-known/est"
CACERTS_PATH = f"{WELL_KNOWN}/cacerts"
SIMPLEREENROLL_PATH = f"{WELL_KNOWN}/simplereenroll"
CSR_TYPE = "application/pkcs10"
CACERTS_TYPE = "application/pkcs7-mime"
CERTS_ONLY_TYPE = "application/pkcs7-mime; smime-type=certs-only"
MAX_BODY = 64 * 1024  # a PKCS#10 request is a few hundred bytes (an RSA 4096 one about 1.7 KB)

_WHITESPACE = re.compile(rb"\s+")
_PEM_CSR = re.compile(
    rb"-----BEGIN (?:NEW )?CERTIFICATE REQUEST-----(.*?)-----END (?:NEW )?CERTIFICATE REQUEST-----", re.S
)


class EstFormatError(ValueError):
    """A body that is not what the operation takes (the message says what is wrong with it)."""


def _unbase64(body: bytes, what: str) -> bytes:
    packed = _WHITESPACE.sub(b"", body)
    if not packed:
        raise EstFormatError(f"the body is empty: expected {what}, base64-encoded")
    try:
        return base64.b64decode(packed, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EstFormatError(f"the body is not base64 ({exc}): expected {what}, base64-encoded") from None


def decode_csr(body: bytes) -> x509.CertificateSigningRequest:
    """The PKCS#10 request of a ``simplereenroll`` body (base64 of DER, or PEM)."""
    if len(body) > MAX_BODY:
        raise EstFormatError(f"the body has {len(body)} bytes; a certificate request has a few hundred")
    pem = _PEM_CSR.search(body)
    der = _unbase64(pem.group(1) if pem else body, "a PKCS#10 certificate request (DER)")
    try:
        return x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise EstFormatError(f"the body is not a PKCS#10 certificate request ({exc})") from None


def encode_csr(csr: x509.CertificateSigningRequest) -> bytes:
    return _base64_lines(csr.public_bytes(serialization.Encoding.DER))


def encode_certs_only(certificates: list[x509.Certificate]) -> bytes:
    """A certs-only PKCS#7 (a SignedData with no signers) holding ``certificates``, base64 in lines."""
    return _base64_lines(pkcs7.serialize_certificates(certificates, serialization.Encoding.DER))


def decode_certs_only(body: bytes) -> list[x509.Certificate]:
    der = _unbase64(body, "a certs-only PKCS#7 (DER)")
    try:
        certificates = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError as exc:
        raise EstFormatError(f"the body is not a certs-only PKCS#7 ({exc})") from None
    if not certificates:
        raise EstFormatError("the PKCS#7 holds no certificate")
    return certificates


def _base64_lines(der: bytes) -> bytes:
    text = base64.b64encode(der)
    return b"\n".join(text[i : i + 64] for i in range(0, len(text), 64)) + b"\n"
