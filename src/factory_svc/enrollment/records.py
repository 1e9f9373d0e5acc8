"""The DPS enrollment records the factory writes, and the revocation check around every write.

``new_enrollment_of`` / ``new_enrollment`` (a fresh record: registration id = device id, X.509, disabled
until the OEM activates it), ``with_certificate`` (an existing record holding another certificate and code
hash), ``enrolled_sha256`` (the thumbprint a record holds).  The records are ``provkit.cloud.Enrollment``;
the DPS JSON is the adapter's.

``RevocationCheck`` is what enrollment needs of revocation (the ledger, through
``factory_svc.revocation.service.RevocationIntents``): is a certificate revoked, does the ledger hold it (then
the factory issued it) and under which issuing CA, and ``enforce`` (a revoked
certificate of the device reached DPS: its revocation steps are owed again).  ``revoked_error`` is the
refusal, CERTIFICATE_REVOKED.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace as dc_replace
from typing import Any, Protocol

from factory_svc.enrollment.lint import LintedCertificate
from factory_svc.revocation.model import Revocation, Standing
from provkit.cloud import Enrollment, ProvisioningStatus, X509Attestation, slot_sha256
from provkit.errors import DomainError, FailedPrecondition
from provkit.errors import Reason as SharedReason


def new_enrollment_of(
    device_id: str, certificate_pem: str, code_hash: Mapping[str, Any], owner: str = ""
) -> Enrollment:
    """A fresh enrollment (registration id = device id): disabled until the OEM activates it."""
    return Enrollment(
        registration_id=device_id,
        device_id=device_id,
        provisioning_status=ProvisioningStatus.DISABLED,
        attestation=X509Attestation(certificate_pem),
        code_hash=code_hash,
        owner=owner or None,
    )


def new_enrollment(linted: LintedCertificate, code_hash: Mapping[str, Any], owner: str = "") -> Enrollment:
    return new_enrollment_of(linted.device_id, linted.leaf_pem, code_hash, owner)


def with_certificate(
    existing: Enrollment, certificate_pem: str, code_hash: Mapping[str, Any], owner: str = ""
) -> Enrollment:
    """``existing`` holding another certificate and code hash (the old code stops working); the owner is
    kept, or ``owner`` when none was named yet; everything else kept."""
    return dc_replace(
        existing,
        attestation=X509Attestation(certificate_pem),
        code_hash=code_hash,
        owner=existing.owner or owner or None,
    )


def enrolled_sha256(enrollment: Enrollment) -> str | None:
    """The SHA-256 thumbprint of the certificate an enrollment holds (from the PEM, else DPS's info)."""
    return slot_sha256(enrollment.attestation.certificate_pem, enrollment.attestation.sha256_thumbprint)


class RevocationCheck(Protocol):
    async def revocation_of(self, sha256_thumbprint: str) -> Revocation | None: ...

    async def revoked_among(self, sha256_thumbprints: Sequence[str]) -> set[str]: ...

    async def recorded_among(
        self, sha256_thumbprints: Sequence[str], issuer_pems: Sequence[str]
    ) -> dict[str, Standing]:
        """The thumbprints whose certificate the ledger holds (the factory issued it): each revoked or not,
        and whether it was issued under one of the issuing CA certificates ``issuer_pems``."""
        ...

    async def enforce(self, device_id: str) -> None:
        """A revoked certificate of the device was written to DPS: have its revocation steps run again."""
        ...


def revoked_error(
    sha256_thumbprint: str, revocation: Revocation | None, field_prefix: str = ""
) -> DomainError:
    """CERTIFICATE_REVOKED for the certificate with this thumbprint."""
    when = f" ({revocation.reason.value}, {revocation.time.isoformat()})" if revocation is not None else ""
    metadata = {"sha256_thumbprint": sha256_thumbprint}
    if revocation is not None:
        metadata["revocation_reason"] = revocation.reason.value
    return FailedPrecondition(
        SharedReason.CERTIFICATE_REVOKED,
        f"{field_prefix}certificate_pem was revoked{when}; mint a new certificate",
        metadata=metadata,
    )
