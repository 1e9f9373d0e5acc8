"""Revocation: the rules of RevokeCertificate.  Plain async Python.

Order of work: validate (target, request id) -> find the certificates (one serial, or every unexpired one
of a device; NOT_FOUND when there is none) -> mark them in the ledger and audit (one transaction; revoked
ones keep their first time and reason) -> publish a new CRL -> the cloud: the device's DPS enrollment, if
it holds a revoked certificate, is disabled and its activation-code hash removed (so no activation can
enable it again; re-enrolling with a new certificate gives a new code), then its IoT Hub identity is
disabled (the hub closes its connections).  Each cloud update is etag-guarded and retried on a concurrent
change.  The cloud steps run again on every call, so a call that failed there (UNAVAILABLE) is finished by
calling again.

Reasons: SERIAL_NUMBER_INVALID, DEVICE_ID_* (see device_id), REVOCATION_TARGET_MISSING,
REVOCATION_REASON_INVALID, REQUEST_ID_INVALID, CERTIFICATE_NOT_FOUND, DPS_UNAVAILABLE / HUB_UNAVAILABLE,
DPS_REFUSED / HUB_REFUSED, ENROLLMENT_CONCURRENTLY_MODIFIED / HUB_DEVICE_CONCURRENTLY_MODIFIED.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from datetime import datetime
from typing import Protocol

from factory_svc.crl import CrlPublisher, PublishedCrl
from factory_svc.enrollment.service import enrolled_sha256
from factory_svc.errors import NotFound, invalid_field
from factory_svc.minting import normalise_serial
from factory_svc.model import IssuedCertificate, Revocation, RevocationReason
from provkit.cloud import (
    CloudEtagMismatch,
    CloudNotFound,
    CloudRejected,
    CloudUnavailable,
    EnrollmentPort,
    HubTwinPort,
    ProvisioningStatus,
    disable_hub_device,
)
from provkit.context import bind_device_id
from provkit.device_id import normalise_device_id
from provkit.errors import Aborted, FailedPrecondition, Unavailable
from provkit.idempotency import check_request_id

log = logging.getLogger("factory_svc.revocation")

_ATTEMPTS = 5


class RevocationLedger(Protocol):
    async def get(self, serial_number: str) -> IssuedCertificate | None: ...

    async def certificates_of(self, device_id: str, now: datetime) -> list[IssuedCertificate]: ...

    async def revoke(
        self, serials: Sequence[str], revocation: Revocation, caller: str, request_id: str
    ) -> tuple[list[IssuedCertificate], int]: ...


@dataclass(frozen=True)
class RevokeRequest:
    device_id: str = ""  # exactly one of device_id / serial_number
    serial_number: str = ""
    reason: RevocationReason = RevocationReason.UNSPECIFIED
    request_id: str = ""
    caller: str = "internal"


@dataclass(frozen=True)
class RevokeResult:
    device_id: str
    certificates: tuple[IssuedCertificate, ...]
    newly_revoked: int
    enrollment_disabled: bool
    hub_identity_disabled: bool
    crl: PublishedCrl


@dataclass(frozen=True)
class CloudSide:
    """Where the device lives in the cloud: DPS enrollments and the linked hubs' registries."""

    dps: EnrollmentPort
    hubs: HubTwinPort


def _unavailable(exc: CloudUnavailable, what: str) -> Unavailable:
    return Unavailable(
        f"{what}_UNAVAILABLE", f"{what} cannot be reached: {exc}", retry_after=exc.retry_after or 5.0
    )


class RevocationService:
    def __init__(
        self,
        ledger: RevocationLedger,
        crl: CrlPublisher,
        cloud: CloudSide | None,
        clock: Callable[[], datetime],
    ) -> None:
        self._ledger = ledger
        self._crl = crl
        self._cloud = cloud
        self._clock = clock

    async def _targets(self, request: RevokeRequest, now: datetime) -> tuple[str, list[IssuedCertificate]]:
        if bool(request.device_id.strip()) == bool(request.serial_number.strip()):
            raise invalid_field(
                "target", "REVOCATION_TARGET_MISSING", "give either a device id or a serial number"
            )
        if request.serial_number.strip():
            serial = normalise_serial(request.serial_number)
            found = await self._ledger.get(serial)
            if found is None:
                raise NotFound(
                    "CERTIFICATE_NOT_FOUND",
                    f"no certificate with serial {serial}",
                    metadata={"serial_number": serial},
                )
            return found.device_id, [found]
        device_id = normalise_device_id(request.device_id)
        found_all = await self._ledger.certificates_of(device_id, now)
        if not found_all:
            raise NotFound(
                "CERTIFICATE_NOT_FOUND",
                f"{device_id} has no unexpired certificate from this factory",
                metadata={"device_id": device_id},
            )
        return device_id, found_all

    async def revoke(self, request: RevokeRequest) -> RevokeResult:
        check_request_id(request.request_id)
        now = self._clock()
        device_id, targets = await self._targets(request, now)
        with bind_device_id(device_id):
            certificates, newly = await self._ledger.revoke(
                [c.serial_number for c in targets],
                Revocation(now, request.reason),
                request.caller,
                request.request_id,
            )
            crl = await self._crl.publish()
            log.info(
                "certificates revoked",
                extra={
                    "serials": ",".join(c.serial_number for c in certificates),
                    "reason": request.reason.value,
                    "newly_revoked": newly,
                    "caller": request.caller,
                    "crl_number": crl.number,
                },
            )
            revoked = {c.sha256_thumbprint.upper() for c in certificates}
            enrollment_disabled, hub = (
                (False, None)
                if self._cloud is None
                else await self._disable_enrollment(self._cloud.dps, device_id, revoked)
            )
            hub_disabled = False
            if self._cloud is not None and hub:
                hub_disabled = await self._disable_hub_identity(self._cloud.hubs, hub, device_id)
        return RevokeResult(device_id, tuple(certificates), newly, enrollment_disabled, hub_disabled, crl)

    @staticmethod
    async def _disable_enrollment(
        dps: EnrollmentPort, device_id: str, revoked: set[str]
    ) -> tuple[bool, str | None]:
        """(changed, the hub the device was registered on) when the enrollment holds a revoked certificate."""
        try:
            for _ in range(_ATTEMPTS):
                enrollment = await dps.get(device_id)
                if enrollment is None or (enrolled_sha256(enrollment) or "").upper() not in revoked:
                    return False, None
                registration = enrollment.registration_state
                hub = (
                    registration.assigned_hub if registration else None
                ) or enrollment.activation.registered_hub
                if not enrollment.enabled and enrollment.code_hash is None:
                    return False, hub
                try:
                    await dps.update(
                        dc_replace(
                            enrollment, provisioning_status=ProvisioningStatus.DISABLED, code_hash=None
                        )
                    )
                except (CloudEtagMismatch, CloudNotFound):
                    continue
                log.info("enrollment disabled (certificate revoked)")
                return True, hub
        except CloudUnavailable as exc:
            raise _unavailable(exc, "DPS") from exc
        except CloudRejected as exc:
            raise FailedPrecondition("DPS_REFUSED", f"DPS refused the update: {exc}") from exc
        raise Aborted("ENROLLMENT_CONCURRENTLY_MODIFIED", "the enrollment kept changing; revoke again")

    @staticmethod
    async def _disable_hub_identity(hubs: HubTwinPort, hub: str, device_id: str) -> bool:
        try:
            disabled = await disable_hub_device(hubs, hub, device_id, _ATTEMPTS)
            if disabled is not None:
                if disabled:
                    log.info("hub identity disabled (certificate revoked)", extra={"hub": hub})
                return disabled
        except CloudUnavailable as exc:
            raise _unavailable(exc, "HUB") from exc
        except CloudRejected as exc:
            raise FailedPrecondition("HUB_REFUSED", f"the IoT hub refused the update: {exc}") from exc
        raise Aborted("HUB_DEVICE_CONCURRENTLY_MODIFIED", "the hub device kept changing; revoke again")
