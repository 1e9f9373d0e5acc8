"""Revocation: the rules of RevokeCertificate.  Plain async Python.

Order of work: validate (target, request id) -> find the certificates (one serial, or every unexpired one
of a device; NOT_FOUND when there is none) -> mark them in the ledger and audit, and open the device's
revocation intent (one transaction; revoked ones keep their first time and reason) -> publish a new CRL ->
the cloud: the device's DPS enrollment, if it holds a revoked certificate, is disabled and its
activation-code hash removed (so no activation can enable it again; re-enrolling with a new certificate
gives a new code), then its IoT Hub identity is disabled (the hub closes its connections) -> the intent is
closed.  Each cloud update is etag-guarded and retried on a concurrent change.

The intent is what makes the cloud steps certain: an intent left open (the call failed there with
UNAVAILABLE, or the process died after the ledger write) is carried out by the service's intent worker at
start-up, then again every few seconds while it fails and at least every ``_SWEEP`` seconds (so a
replica's open intents are finished by another one if it dies), and by the next revocation of the device.
The steps compute their target from the ledger (every revoked certificate of the device), so running them
twice, or on two replicas at once, does the same thing.

The enrollment side (Enroll, the outbox delivery) checks a certificate's revocation before writing it to
DPS and once more after: a revocation committed before that second check either saw the write (and
disables it) or is seen by it, and then ``RevocationIntents.enforce`` reopens the device's intent.  So a
revocation racing with an enrollment always ends with the enrollment disabled.

Reasons: SERIAL_NUMBER_INVALID, DEVICE_ID_* (see device_id), REVOCATION_TARGET_MISSING,
REVOCATION_REASON_INVALID, REQUEST_ID_INVALID, CERTIFICATE_NOT_FOUND, DPS_UNAVAILABLE / HUB_UNAVAILABLE,
DPS_REFUSED / HUB_REFUSED, ENROLLMENT_CONCURRENTLY_MODIFIED / HUB_DEVICE_CONCURRENTLY_MODIFIED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from datetime import datetime
from typing import Protocol

from factory_svc.enrollment.records import enrolled_sha256
from factory_svc.errors import NotFound, Reason, invalid_field
from factory_svc.mint.model import IssuedCertificate
from factory_svc.mint.service import normalise_serial
from factory_svc.revocation.crl import CrlPublisher, PublishedCrl
from factory_svc.revocation.model import Revocation, RevokeRequest, Standing
from factory_svc.revocation.store import RevocationIntent
from provkit.clock import Clock
from provkit.cloud import (
    CloudEtagMismatch,
    CloudNotFound,
    EnrollmentPort,
    HubTwinPort,
    ProvisioningStatus,
    disable_hub_device,
    slot_sha256,
)
from provkit.cloud_errors import CloudService, translating_cloud_errors
from provkit.context import bind_device_id
from provkit.device_id import normalise_device_id
from provkit.errors import Aborted, DomainError
from provkit.errors import Reason as SharedReason
from provkit.faults import crash_point
from provkit.idempotency import check_request_id

log = logging.getLogger("factory_svc.revocation.service")

_ATTEMPTS = 5
_SWEEP = 30.0  # seconds between two looks at the open intents when nothing wakes the worker
_RETRY_FIRST, _RETRY_MAX = 1.0, 30.0  # while an intent cannot be finished (DPS or a hub unreachable)


class CertificateLookup(Protocol):
    """The certificates a revocation names (``factory_svc.mint.store.CertificateStore``)."""

    async def get(self, serial_number: str) -> IssuedCertificate | None: ...

    async def certificates_of(self, device_id: str, now: datetime) -> list[IssuedCertificate]: ...


class RevocationLookups(Protocol):
    async def revocation_of(self, sha256_thumbprint: str) -> Revocation | None: ...

    async def revoked_among(self, sha256_thumbprints: Sequence[str]) -> set[str]: ...

    async def recorded_among(
        self, sha256_thumbprints: Sequence[str], issuer_pems: Sequence[str]
    ) -> dict[str, Standing]: ...


class IntentLedger(Protocol):
    """Where revocation intents are kept (the ledger, ``revocation_intents``)."""

    async def open_revocation_intent(self, device_id: str, now: datetime) -> None: ...

    async def open_revocation_intents(self) -> list[RevocationIntent]: ...

    async def revocation_intent(self, device_id: str) -> RevocationIntent | None: ...

    async def close_revocation_intent(self, intent: RevocationIntent, now: datetime) -> bool: ...

    async def revocation_intent_failed(self, intent: RevocationIntent, reason: str) -> None: ...


class RevocationLedger(RevocationLookups, IntentLedger, Protocol):
    """Where revocations are kept (``factory_svc.revocation.store.RevocationStore``): mark certificates,
    answer what is revoked, and the intents."""

    async def revoke(
        self,
        serials: Sequence[str],
        revocation: Revocation,
        caller: str,
        request_id: str,
        intent_for: str | None = None,
    ) -> tuple[list[IssuedCertificate], int]: ...


class RevocationIntents:
    """What the enrollment side needs of revocation: is a certificate revoked (or in the ledger at all), and
    ``enforce`` (a revoked certificate of the device reached DPS: its revocation steps are owed again).
    ``changed`` wakes the intent worker."""

    def __init__(self, ledger: RevocationLedger, clock: Clock) -> None:
        self._ledger = ledger
        self._clock = clock
        self.changed = asyncio.Event()

    async def revocation_of(self, sha256_thumbprint: str) -> Revocation | None:
        return await self._ledger.revocation_of(sha256_thumbprint)

    async def revoked_among(self, sha256_thumbprints: Sequence[str]) -> set[str]:
        return await self._ledger.revoked_among(sha256_thumbprints)

    async def recorded_among(
        self, sha256_thumbprints: Sequence[str], issuer_pems: Sequence[str]
    ) -> dict[str, Standing]:
        return await self._ledger.recorded_among(sha256_thumbprints, issuer_pems)

    async def enforce(self, device_id: str) -> None:
        """Reopen the device's revocation intent (durably) and wake the worker that carries it out."""
        await self._ledger.open_revocation_intent(device_id, self._clock())
        log.warning("a revoked certificate reached DPS; its revocation steps run again")
        self.changed.set()


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


def _cloud_step(service: CloudService) -> contextlib.AbstractContextManager[None]:
    """A cloud step's failures as RevokeCertificate answers them: unreachable says the revocation holds."""
    return translating_cloud_errors(
        service,
        refused="the update",
        unavailable_note="; the revocation is recorded (ledger, CRL) and the factory keeps trying to disable "
        "the device; call again to see it done",
    )


class RevocationService:
    def __init__(
        self,
        certificates: CertificateLookup,
        ledger: RevocationLedger,
        crl: CrlPublisher,
        cloud: CloudSide | None,
        clock: Clock,
        intents: RevocationIntents | None = None,
    ) -> None:
        self._certificates = certificates
        self._ledger = ledger
        self._crl = crl
        self._cloud = cloud
        self._clock = clock
        self.intents = intents or RevocationIntents(ledger, clock)
        self._worker: asyncio.Task[None] | None = None

    async def _targets(self, request: RevokeRequest, now: datetime) -> tuple[str, list[IssuedCertificate]]:
        if bool(request.device_id.strip()) == bool(request.serial_number.strip()):
            raise invalid_field(
                "target", Reason.REVOCATION_TARGET_MISSING, "give either a device id or a serial number"
            )
        if request.serial_number.strip():
            serial = normalise_serial(request.serial_number)
            found = await self._certificates.get(serial)
            if found is None:
                raise NotFound(
                    Reason.CERTIFICATE_NOT_FOUND,
                    f"no certificate with serial {serial}",
                    metadata={"serial_number": serial},
                )
            return found.device_id, [found]
        device_id = normalise_device_id(request.device_id)
        found_all = await self._certificates.certificates_of(device_id, now)
        if not found_all:
            raise NotFound(
                Reason.CERTIFICATE_NOT_FOUND,
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
                intent_for=None if self._cloud is None else device_id,
            )
            crash_point("revoke.after_ledger")  # marked, intent open; CRL and cloud steps not done
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
            enrollment_disabled = hub_disabled = False
            intent = await self._ledger.revocation_intent(device_id) if self._cloud is not None else None
            if intent is not None:
                enrollment_disabled, hub_disabled = await self._carry_out(intent)
        return RevokeResult(device_id, tuple(certificates), newly, enrollment_disabled, hub_disabled, crl)

    # ------------------------------------------------------------------------------------- intents
    async def _carry_out(self, intent: RevocationIntent) -> tuple[bool, bool]:
        """The intent's cloud steps, then the intent closed: (enrollment disabled now, hub identity disabled
        now).  A failure is recorded on the intent (still open) and raised."""
        assert self._cloud is not None
        device_id = intent.device_id
        try:
            now = self._clock()
            revoked = {
                c.sha256_thumbprint.upper()
                for c in await self._certificates.certificates_of(device_id, now)
                if c.revocation is not None
            }
            enrollment_disabled, hub = await self._disable_enrollment(self._cloud.dps, device_id, revoked)
            crash_point("revoke.after_dps_write")  # the enrollment disabled, the hub identity not yet
            hub_disabled = False
            if hub:
                hub_disabled = await self._disable_hub_identity(self._cloud.hubs, hub, device_id)
        except DomainError as exc:
            await self._ledger.revocation_intent_failed(intent, exc.reason)
            raise
        if await self._ledger.close_revocation_intent(intent, self._clock()):
            log.info("revocation intent carried out", extra={"attempts": intent.attempts + 1})
        return enrollment_disabled, hub_disabled

    async def complete_open_intents(self) -> int:
        """Carry out every open revocation intent (start-up, and the worker); answer how many are still
        open because their steps failed (each failure is logged and recorded on its intent)."""
        if self._cloud is None:
            return 0
        failed = 0
        for intent in await self._ledger.open_revocation_intents():
            with bind_device_id(intent.device_id):
                try:
                    await self._carry_out(intent)
                except DomainError as exc:
                    failed += 1
                    log.warning("revocation intent still open", extra={"reason": exc.reason})
                except Exception:  # one intent's surprise must not hold up the others
                    failed += 1
                    log.exception("revocation intent failed unexpectedly; it stays open")
        return failed

    def start(self) -> None:
        """The intent worker: open intents carried out now (start-up), whenever ``enforce`` reopens one,
        every few seconds while some fail, and every ``_SWEEP`` seconds."""
        if self._worker is None and self._cloud is not None:
            self._worker = asyncio.create_task(self._work(), name="revocation-intents")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def _work(self) -> None:
        delay = _RETRY_FIRST
        while True:
            self.intents.changed.clear()  # before looking: an enforce from now on wakes the wait below
            try:
                failed = await self.complete_open_intents()
            except Exception:  # the ledger is away: try again later
                log.exception("revocation intents could not be read")
                failed = 1
            pause = delay if failed else _SWEEP
            delay = min(_RETRY_MAX, delay * 2) if failed else _RETRY_FIRST
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.intents.changed.wait(), pause)

    @staticmethod
    async def _disable_enrollment(
        dps: EnrollmentPort, device_id: str, revoked: set[str]
    ) -> tuple[bool, str | None]:
        """(changed, the hub the device was registered on) when the enrollment holds a revoked certificate."""
        with _cloud_step(CloudService.DPS):
            for _ in range(_ATTEMPTS):
                enrollment = await dps.get(device_id)
                if enrollment is None:
                    return False, None
                attestation = enrollment.attestation
                secondary_revoked = (
                    slot_sha256(attestation.secondary_pem, attestation.secondary_sha256_thumbprint) in revoked
                )
                if secondary_revoked:  # a renewal's new certificate: DPS must not accept it any more
                    attestation = dc_replace(
                        attestation, secondary_pem=None, secondary_sha256_thumbprint=None
                    )
                if (enrolled_sha256(enrollment) or "").upper() not in revoked:
                    if not secondary_revoked:
                        return False, None
                    try:
                        await dps.update(dc_replace(enrollment, attestation=attestation))
                    except (CloudEtagMismatch, CloudNotFound):
                        continue
                    log.info("revoked renewal certificate removed from the enrollment's secondary slot")
                    return False, None
                registration = enrollment.registration_state
                hub = (
                    registration.assigned_hub if registration else None
                ) or enrollment.activation.registered_hub
                if not enrollment.enabled and enrollment.code_hash is None and not secondary_revoked:
                    return False, hub
                try:
                    await dps.update(
                        dc_replace(
                            enrollment,
                            attestation=attestation,
                            provisioning_status=ProvisioningStatus.DISABLED,
                            code_hash=None,
                        )
                    )
                except (CloudEtagMismatch, CloudNotFound):
                    continue
                log.info("enrollment disabled (certificate revoked)")
                return True, hub
        raise Aborted(
            SharedReason.ENROLLMENT_CONCURRENTLY_MODIFIED, "the enrollment kept changing; revoke again"
        )

    @staticmethod
    async def _disable_hub_identity(hubs: HubTwinPort, hub: str, device_id: str) -> bool:
        with _cloud_step(CloudService.HUB):
            disabled = await disable_hub_device(hubs, hub, device_id, _ATTEMPTS)
        if disabled is not None:
            if disabled:
                log.info("hub identity disabled (certificate revoked)", extra={"hub": hub})
            return disabled
        raise Aborted(
            SharedReason.HUB_DEVICE_CONCURRENTLY_MODIFIED, "the hub device kept changing; revoke again"
        )
