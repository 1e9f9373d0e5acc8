"""Preflight checks of a certificate before it is enrolled (pure: no I/O, nothing written).

``lint_certificate`` is the whole check: ``inspect_certificate`` (the form, the names, the usage, the
validity) and ``verify_issued_by_factory`` (the signature, against the factory's issuing CAs).  The signature
check is left out (by the enrollment writer) only for a certificate the factory's ledger holds, this very DER,
recorded with one of the current issuing CA certificates (``LintPolicy.issuer_pems``) as its issuer: that CA's
key signed it.  Any other certificate gets it checked.

Reasons: DEVICE_ID_* (see provkit.device_id), CERTIFICATE_MISSING, CERTIFICATE_MALFORMED,
CERTIFICATE_SUBJECT_MISMATCH, CERTIFICATE_IS_CA, CERTIFICATE_EKU_MISSING, CERTIFICATE_NOT_YET_VALID,
CERTIFICATE_EXPIRED, CERTIFICATE_VALIDITY_TOO_SHORT, CERTIFICATE_UNTRUSTED.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from factory_svc.errors import CaConfigError, Reason, invalid_field
from provkit.device_id import normalise_device_id
from provkit.errors import Reason as SharedReason

FIELD = "certificate_pem"


@dataclass(frozen=True)
class LintedCertificate:
    device_id: str
    leaf: x509.Certificate
    leaf_pem: str  # the leaf alone, as enrolled in DPS
    sha1_thumbprint: str
    sha256_thumbprint: str
    not_after: datetime


@dataclass(frozen=True)
class LintPolicy:
    trust_roots: tuple[x509.Certificate, ...]  # the factory CA's root(s)
    intermediates: tuple[x509.Certificate, ...]  # the factory's issuing CA(s)
    min_remaining_validity: timedelta = timedelta(days=30)
    # each issuing CA certificate as the ledger records it in a chain (PEM), for ``RevocationCheck``
    issuer_pems: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        pems = tuple(ca.public_bytes(serialization.Encoding.PEM).decode("ascii") for ca in self.intermediates)
        object.__setattr__(self, "issuer_pems", pems)


def lint_certificate(
    raw_device_id: str, certificate_pem: str, policy: LintPolicy, now: datetime, field_prefix: str = ""
) -> LintedCertificate:
    """Every check, the signature included."""
    linted = inspect_certificate(raw_device_id, certificate_pem, policy, now, field_prefix)
    verify_issued_by_factory(linted, policy, field_prefix)
    return linted


def inspect_certificate(
    raw_device_id: str, certificate_pem: str, policy: LintPolicy, now: datetime, field_prefix: str = ""
) -> LintedCertificate:
    """Every check but the signature (``verify_issued_by_factory``)."""

    def named(name: str) -> str:
        return f"{field_prefix}{name}"

    device_id = normalise_device_id(raw_device_id, named("device_id"))
    if not certificate_pem.strip():
        raise invalid_field(named(FIELD), Reason.CERTIFICATE_MISSING, "no certificate was given")
    try:
        certs = x509.load_pem_x509_certificates(certificate_pem.encode("utf-8", "replace"))
    except ValueError:
        raise invalid_field(
            named(FIELD), Reason.CERTIFICATE_MALFORMED, "certificate_pem is not a PEM certificate"
        ) from None
    leaf = certs[0]  # any chain after the leaf is ignored: only this factory's issuing CAs count
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    if common_name != device_id:
        raise invalid_field(
            named(FIELD),
            SharedReason.CERTIFICATE_SUBJECT_MISMATCH,
            f"the certificate's subject CN {common_name!r} is not the device id {device_id!r}",
            common_name=common_name,
        )
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise invalid_field(
                named(FIELD), Reason.CERTIFICATE_IS_CA, "a CA certificate cannot be a device identity"
            )
    except x509.ExtensionNotFound:
        pass
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        has_client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in usages
    except x509.ExtensionNotFound:
        has_client_auth = False
    if not has_client_auth:
        raise invalid_field(
            named(FIELD),
            Reason.CERTIFICATE_EKU_MISSING,
            "the certificate lacks extended key usage clientAuth",
        )
    not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < not_before:
        raise invalid_field(
            named(FIELD),
            SharedReason.CERTIFICATE_NOT_YET_VALID,
            f"the certificate is valid from {not_before.isoformat()}",
        )
    if now >= not_after:
        raise invalid_field(
            named(FIELD),
            SharedReason.CERTIFICATE_EXPIRED,
            f"the certificate expired at {not_after.isoformat()}",
        )
    if not_after - now < policy.min_remaining_validity:
        raise invalid_field(
            named(FIELD),
            Reason.CERTIFICATE_VALIDITY_TOO_SHORT,
            f"the certificate expires at {not_after.isoformat()}; at least "
            f"{policy.min_remaining_validity.days} days of validity are required",
        )
    der = leaf.public_bytes(serialization.Encoding.DER)
    return LintedCertificate(
        device_id=device_id,
        leaf=leaf,
        leaf_pem=_pem(der),
        # Azure's thumbprints: hashes of the DER encoding (one encoding, two hashlib calls).
        sha1_thumbprint=hashlib.sha1(der).hexdigest().upper(),  # noqa: S324 - Azure's thumbprint
        sha256_thumbprint=hashlib.sha256(der).hexdigest().upper(),
        not_after=not_after,
    )


def _pem(der: bytes) -> str:
    """The PEM text ``public_bytes(Encoding.PEM)`` gives, from the DER already at hand (64-column base64)."""
    text = base64.b64encode(der).decode("ascii")
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


def verify_issued_by_factory(linted: LintedCertificate, policy: LintPolicy, field_prefix: str = "") -> None:
    """The leaf's issuer name is an issuing CA's subject and its signature verifies with that CA's key.
    ``verify_directly_issued_by`` compares the names itself (in Rust): no Python ``Name`` objects."""
    leaf, field_name = linted.leaf, f"{field_prefix}{FIELD}"
    for ca in policy.intermediates:
        try:
            leaf.verify_directly_issued_by(ca)
            return
        except ValueError:
            continue  # another issuer name (or a signature algorithm this CA cannot have made)
        except (TypeError, InvalidSignature) as exc:
            detail = str(exc) or "the signature does not verify with the issuing CA's key"
            raise invalid_field(
                field_name,
                Reason.CERTIFICATE_UNTRUSTED,
                f"the certificate does not verify to this factory's CA ({detail})",
            ) from None
    raise invalid_field(
        field_name,
        Reason.CERTIFICATE_UNTRUSTED,
        f"the certificate does not verify to this factory's CA (issued by "
        f"{leaf.issuer.rfc4514_string()!r}, not by this factory's issuing CA)",
    )


def lint_policy_from_chain(
    chain: Sequence[x509.Certificate], min_remaining_validity: timedelta
) -> LintPolicy:
    """From the factory CA chain (issuing CA ... root): the self-signed tail is the root.  Each issuing CA's
    signature is checked against its issuer in the chain once, here; a device certificate then only needs
    its own signature checked against the issuing CA that signed it."""
    roots = tuple(c for c in chain if c.issuer == c.subject) or (chain[-1],)
    intermediates = tuple(c for c in chain if c.issuer != c.subject)
    everyone = (*intermediates, *roots)
    for ca in intermediates:
        issuer = next((c for c in everyone if c.subject == ca.issuer and c is not ca), None)
        if issuer is None:
            raise CaConfigError(f"the chain lacks the issuer of {ca.subject.rfc4514_string()}")
        ca.verify_directly_issued_by(issuer)
    return LintPolicy(roots, intermediates, min_remaining_validity)
