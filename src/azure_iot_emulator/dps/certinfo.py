"""Certificates as DPS accepts them (PEM text, base64 DER, base64 PEM) and the ``info`` it computes."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes


class CertificateError(ValueError):
    pass


def parse_certificate(text: str) -> x509.Certificate:
    if not isinstance(text, str) or not text.strip():
        raise CertificateError("certificate must be a non-empty string")
    stripped = text.strip()
    try:
        if "-----BEGIN" in stripped:
            return x509.load_pem_x509_certificate(stripped.encode("ascii"))
        raw = base64.b64decode("".join(stripped.split()), validate=True)
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except (ValueError, binascii.Error, UnicodeEncodeError) as exc:
        raise CertificateError(f"certificate does not parse: {exc}") from exc


def thumbprints(cert: x509.Certificate) -> tuple[str, str]:
    sha1 = cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - Azure's thumbprint
    return sha1, cert.fingerprint(hashes.SHA256()).hex().upper()


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_info(cert: x509.Certificate) -> dict[str, Any]:
    sha1, sha256 = thumbprints(cert)
    return {
        "subjectName": cert.subject.rfc4514_string(),
        "sha1Thumbprint": sha1,
        "sha256Thumbprint": sha256,
        "issuerName": cert.issuer.rfc4514_string(),
        "notBeforeUtc": _utc(cert.not_valid_before_utc),
        "notAfterUtc": _utc(cert.not_valid_after_utc),
        "serialNumber": format(cert.serial_number, "X"),
        "version": cert.version.value + 1,
    }


def common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
