"""Certificates as DPS accepts them (PEM text, base64 DER, base64 PEM) and the ``info`` it computes."""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization


class CertificateError(ValueError):
    pass


_PEM_BEGIN, _PEM_END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"


def _plain_pem_der(stripped: str) -> bytes | None:
    """The DER inside a text that is exactly one plain PEM certificate block, else None (then the general
    PEM reader decides).  Decoding base64 here is a fraction of the cost of the general reader."""
    if not (stripped.startswith(_PEM_BEGIN) and stripped.endswith(_PEM_END)):
        return None
    body = "".join(stripped[len(_PEM_BEGIN) : -len(_PEM_END)].split())
    try:
        return binascii.a2b_base64(body, strict_mode=True)
    except binascii.Error:
        return None


def parse_certificate(text: str) -> x509.Certificate:
    if not isinstance(text, str) or not text.strip():
        raise CertificateError("certificate must be a non-empty string")
    stripped = text.strip()
    try:
        if "-----BEGIN" in stripped:
            der = _plain_pem_der(stripped)
            if der is not None:
                try:
                    return x509.load_der_x509_certificate(der)
                except ValueError:
                    pass  # the general reader gives the error
            return x509.load_pem_x509_certificate(stripped.encode("ascii"))
        raw = base64.b64decode("".join(stripped.split()), validate=True)
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except (ValueError, binascii.Error, UnicodeEncodeError) as exc:
        raise CertificateError(f"certificate does not parse: {exc}") from exc


def thumbprints(cert: x509.Certificate) -> tuple[str, str]:
    """(SHA-1, SHA-256) of the DER encoding, upper-case hex (Azure's thumbprints).  One DER encoding and
    hashlib: about half the cost of two ``cert.fingerprint`` calls."""
    der = cert.public_bytes(serialization.Encoding.DER)
    sha1 = hashlib.sha1(der).hexdigest().upper()  # noqa: S324 - Azure's thumbprint
    return sha1, hashlib.sha256(der).hexdigest().upper()


def _utc(moment: datetime) -> str:
    m = moment.astimezone(UTC)  # no strftime: a third of the cost
    return f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}Z"


_ISSUER_NAMES: dict[x509.Name, str] = {}


def _issuer_name(name: x509.Name) -> str:
    """RFC 4514 text of an issuer name; the few issuers (CAs) are remembered."""
    text = _ISSUER_NAMES.get(name)
    if text is None:
        if len(_ISSUER_NAMES) >= 64:
            _ISSUER_NAMES.clear()
        text = _ISSUER_NAMES[name] = name.rfc4514_string()
    return text


def certificate_info(cert: x509.Certificate) -> dict[str, Any]:
    sha1, sha256 = thumbprints(cert)
    return {
        "subjectName": cert.subject.rfc4514_string(),
        "sha1Thumbprint": sha1,
        "sha256Thumbprint": sha256,
        "issuerName": _issuer_name(cert.issuer),
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
