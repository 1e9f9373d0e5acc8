"""Which enrollment a registering device belongs to, and whether its credentials prove it (pure: the
stored records and the clock are parameters).

Azure's order: an individual enrollment of the registration id decides alone (so a disabled one keeps a
device of an enabled group out, and its attestation must fit); otherwise the device's credentials pick the
group:

- X.509: the leaf's CN is the registration id, and from the leaf up the chain the device presented, the
  nearest certificate signed by (or equal to) a group's signing certificate (primary or secondary) names
  the group.  Every certificate on that path must be valid now, each signature must verify, and each
  signer must be a CA (basic constraints ``cA``; ``keyCertSign`` when it has a key usage), so a group
  device cannot certify a key of its own under another registration id.
- Symmetric key (SAS, the MQTT password or the HTTPS ``Authorization``): ``sr`` is
  ``{idScope}/registrations/{registrationId}``, ``skn`` absent or ``registration``, signed with the
  individual enrollment's key or, for a group, the device key derived from the group's key
  (:func:`derive_device_key`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from azure_iot_emulator.dps.certinfo import (
    CertificateError,
    certificate_info,
    common_name,
    parse_certificate,
    thumbprints,
)
from azure_iot_emulator.dps.errors import DpsError, unauthorized
from azure_iot_emulator.sas import SasError, parse_sas, verify_sas

DEVICE_SAS_POLICY = "registration"


@dataclass(frozen=True)
class DeviceCredentials:
    """What a device presented: its TLS client certificate and the chain above it, or a SAS token."""

    leaf: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = ()
    sas: str | None = None


@dataclass(frozen=True)
class Match:
    """The enrollment a device registers under.  ``kind`` says whether it is an individual enrollment or
    an enrollment group (``record`` is then the stored IndividualEnrollment or EnrollmentGroup body)."""

    kind: Literal["individual", "group"]
    record: Mapping[str, Any]
    symmetric_keys: tuple[str, str] | None
    """The device's keys for its hub identity (SAS devices), else None (X.509: the leaf's thumbprint)."""
    result: dict[str, Any]
    """The attestation part of the registration state: ``{"x509": {...}}`` or ``{"symmetricKey": {...}}``."""

    @property
    def enabled(self) -> bool:
        return bool(self.record.get("provisioningStatus", "enabled") == "enabled")

    @property
    def group_id(self) -> str | None:
        return self.record.get("enrollmentGroupId") if self.kind == "group" else None


def derive_device_key(group_key_b64: str, registration_id: str) -> str:
    """Azure's device key of a symmetric-key group: base64(HMAC-SHA256(base64decode(group key), id))."""
    digest = hmac.new(base64.b64decode(group_key_b64), registration_id.encode("utf-8"), hashlib.sha256)
    return base64.b64encode(digest.digest()).decode("ascii")


def resolve(
    registration_id: str,
    credentials: DeviceCredentials,
    *,
    id_scope: str,
    individual: Mapping[str, Any] | None,
    groups: Sequence[Mapping[str, Any]],
    now: datetime,
) -> Match:
    """The enrollment ``credentials`` prove; :class:`DpsError` 401 when they do not, 404 when neither an
    individual enrollment nor a group fits."""
    if individual is not None:
        return _individual(registration_id, credentials, individual, id_scope, now)
    if credentials.leaf is not None:
        match = _x509_group(registration_id, credentials, groups, now)
    elif credentials.sas is not None:
        match = _sas_group(registration_id, credentials.sas, groups, id_scope, now)
    else:
        raise unauthorized("Unauthorized: no certificate and no SAS token")
    if match is None:
        raise DpsError(404, 404201, f"No enrollment for registration id {registration_id}")
    return match


def _individual(
    registration_id: str,
    credentials: DeviceCredentials,
    enrollment: Mapping[str, Any],
    id_scope: str,
    now: datetime,
) -> Match:
    attestation = enrollment["attestation"]
    kind = attestation.get("type")
    if kind == "x509":
        leaf = _checked_leaf(registration_id, credentials, now)
        sha1, sha256 = thumbprints(leaf)
        certs = attestation["x509"]["clientCertificates"]
        for slot in ("primary", "secondary"):
            info = (certs.get(slot) or {}).get("info") or {}
            if sha1 == info.get("sha1Thumbprint") or sha256 == info.get("sha256Thumbprint"):
                result = {"x509": {"certificateInfo": certificate_info(leaf)}}
                return Match("individual", enrollment, None, result)
        raise unauthorized("Invalid certificate: thumbprint does not match the enrollment")
    if kind == "symmetricKey":
        keys = attestation["symmetricKey"]
        primary, secondary = keys["primaryKey"], keys["secondaryKey"]
        if credentials.sas is None:
            raise unauthorized("Unauthorized: symmetric-key attestation needs a SAS token")
        if not _sas_signed_by(credentials.sas, (primary, secondary), registration_id, id_scope, now):
            raise unauthorized("Unauthorized: SAS token does not verify with the enrollment's keys")
        return Match("individual", enrollment, (primary, secondary), {"symmetricKey": {}})
    raise unauthorized(f"Unauthorized: {kind} attestation is not emulated")


def _checked_leaf(registration_id: str, credentials: DeviceCredentials, now: datetime) -> x509.Certificate:
    leaf = credentials.leaf
    if leaf is None:
        raise unauthorized("Invalid certificate: X.509 attestation needs a client certificate")
    cn = common_name(leaf)
    if cn is None or cn.lower() != registration_id.lower():
        raise unauthorized("Invalid certificate: subject CN does not match the registration id")
    if not _valid_now(leaf, now):
        raise unauthorized("Invalid certificate: expired or not yet valid")
    return leaf


def _valid_now(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` may sign certificates (RFC 5280 4.2.1.9 and 4.2.1.3): ``cA`` true in its basic
    constraints and, when it has a key usage, ``keyCertSign``.  A device's own certificate is an end
    entity: what it signs proves nothing."""
    try:
        extensions = cert.extensions
    except ValueError:  # extensions cryptography cannot parse (a duplicate, a malformed one)
        return False
    try:
        if not extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return bool(extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign)
    except x509.ExtensionNotFound:
        return True


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``issuer`` is a CA and signed ``cert``."""
    if cert.issuer != issuer.subject or not _is_ca(issuer):
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


_PARSED: dict[str, x509.Certificate] = {}


def _signing_certificates(group: Mapping[str, Any]) -> list[x509.Certificate]:
    """The group's signing certificates, parsed once per text (a few hundred groups at most)."""
    out = []
    slots = (group["attestation"].get("x509") or {}).get("signingCertificates") or {}
    for slot in ("primary", "secondary"):
        text = (slots.get(slot) or {}).get("certificate")
        if not isinstance(text, str):
            continue
        cert = _PARSED.get(text)
        if cert is None:
            try:
                cert = parse_certificate(text)
            except CertificateError:  # pragma: no cover - validated when the group was written
                continue
            if len(_PARSED) >= 1024:
                _PARSED.clear()
            _PARSED[text] = cert
        out.append(cert)
    return out


def _x509_group(
    registration_id: str, credentials: DeviceCredentials, groups: Sequence[Mapping[str, Any]], now: datetime
) -> Match | None:
    x509_groups = [g for g in groups if g["attestation"].get("type") == "x509"]
    if not x509_groups:
        return None
    leaf = _checked_leaf(registration_id, credentials, now)
    signers = [(g, cert) for g in x509_groups for cert in _signing_certificates(g)]
    current, path = leaf, [leaf]
    while True:
        for group, signer in signers:
            if _issued_by(current, signer) and _valid_now(signer, now):
                info = certificate_info(leaf)
                return Match(
                    "group",
                    group,
                    None,
                    {"x509": {"certificateInfo": info, "enrollmentGroupId": group["enrollmentGroupId"]}},
                )
        parent = next((c for c in credentials.chain if c not in path and _issued_by(current, c)), None)
        if parent is None:
            raise unauthorized("Invalid certificate chain: no enrollment group signs the device's chain")
        if not _valid_now(parent, now):
            raise unauthorized("Invalid certificate chain: a certificate in the chain is expired")
        current = parent
        path.append(parent)


def _sas_signed_by(
    token: str, keys: Sequence[str], registration_id: str, id_scope: str, now: datetime
) -> bool:
    try:
        skn = parse_sas(token).policy
    except SasError:
        return False
    if skn is not None and skn.lower() != DEVICE_SAS_POLICY:
        return False
    resource = f"{id_scope}/registrations/{registration_id}"
    for key in keys:
        try:
            verify_sas(token, key_b64=key, policy=None, now=now, resources=[resource])
        except SasError:
            continue
        return True
    return False


def _sas_group(
    registration_id: str, token: str, groups: Sequence[Mapping[str, Any]], id_scope: str, now: datetime
) -> Match | None:
    sas_groups = [g for g in groups if g["attestation"].get("type") == "symmetricKey"]
    if not sas_groups:
        return None
    for group in sas_groups:
        keys = group["attestation"]["symmetricKey"]
        derived = (
            derive_device_key(keys["primaryKey"], registration_id),
            derive_device_key(keys["secondaryKey"], registration_id),
        )
        if _sas_signed_by(token, derived, registration_id, id_scope, now):
            return Match(
                "group", group, derived, {"symmetricKey": {"enrollmentGroupId": group["enrollmentGroupId"]}}
            )
    raise unauthorized("Unauthorized: SAS token does not verify with any enrollment group's derived key")
