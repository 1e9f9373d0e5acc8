"""Who owns a device, and when the factory may rework its enrollment: the rules both the live path, the
outbox delivery and TransferOwnership apply (no gRPC, no Azure SDK).

- **Owner**: the OEM (its tenant id) named at enrollment, or later by ``OwnershipService.transfer`` while
  the device has not been activated; otherwise the first activation claims it (activation_svc).  Enroll
  never changes an owner that is there: naming another one is FAILED_PRECONDITION
  OWNER_CHANGE_NEEDS_TRANSFER.
- **Replace** on a device that has been activated or has registered is a factory decision with a trail:
  it needs a reason (FAILED_PRECONDITION REPLACE_REASON_REQUIRED without), the new code hash replaces the
  old one (the old code stops working), the owner stays, and the enrollment audit records the caller and
  the reason.

API: ``check_owner(value, field)``, ``check_reason(value, field)`` (INVALID_ARGUMENT OWNER_INVALID /
REASON_INVALID), ``stage_of(enrollment)``, ``replace_refusal(existing, owner, reason)``,
``owner_refusal(existing, owner)``, ``OwnershipService(dps, outbox, clock).transfer(command)``.
"""

from __future__ import annotations

import logging
from dataclasses import replace as dc_replace
from typing import Any

from factory_svc.enrollment.model import TransferCommand, TransferResult
from factory_svc.enrollment.outbox import AuditRecord, Outbox
from factory_svc.errors import Reason
from provkit.clock import Clock
from provkit.cloud import CloudEtagMismatch, CloudNotFound, Enrollment, EnrollmentPort
from provkit.cloud_errors import CloudService, translating_cloud_errors
from provkit.context import bind_device_id
from provkit.device_id import normalise_device_id
from provkit.errors import Aborted, DomainError, FailedPrecondition, NotFound, invalid_field
from provkit.errors import Reason as SharedReason
from provkit.idempotency import LOST_RACE, LostRace, RequestIds, Stored, check_request_id, fingerprint
from provkit.parties import is_tenant

log = logging.getLogger("factory_svc.ownership")

MAX_REASON = 200
_MAX_ATTEMPTS = 8


def check_owner(value: str, field: str) -> str:
    """``value`` as an OEM id ("" stays "": no owner named)."""
    owner = value.strip()
    if owner and not is_tenant(owner):
        raise invalid_field(
            field,
            Reason.OWNER_INVALID,
            "an OEM id is 1-63 characters of a-z, 0-9 and '-' (not at either end)",
        )
    return owner


def check_reason(value: str, field: str) -> str:
    reason = value.strip()
    if len(reason) > MAX_REASON or any(not c.isprintable() for c in reason):
        raise invalid_field(
            field, Reason.REASON_INVALID, f"a reason is at most {MAX_REASON} printable characters on one line"
        )
    return reason


def stage_of(enrollment: Enrollment) -> str:
    """``registered`` (DPS assigned it a hub), ``activated`` (an OEM activated it, maybe since
    deactivated) or ``enrolled``."""
    registration = enrollment.registration_state
    if registration is not None and (registration.assigned or registration.status == "assigned"):
        return "registered"
    if enrollment.activation.activated_at is not None:
        return "activated"
    return "enrolled"


def owner_refusal(existing: Enrollment, owner: str) -> DomainError | None:
    """Enroll names ``owner`` (may be "") for a device that has an enrollment already."""
    if owner and owner != (existing.owner or ""):
        return FailedPrecondition(
            Reason.OWNER_CHANGE_NEEDS_TRANSFER,
            f"the device's owner is {existing.owner or 'not named yet'}; "
            "change it with TransferOwnership (before activation)",
            metadata={"owner_oem": existing.owner or ""},
        )
    return None


def replace_refusal(existing: Enrollment, owner: str, reason: str) -> DomainError | None:
    refusal = owner_refusal(existing, owner)
    if refusal is not None:
        return refusal
    stage = stage_of(existing)
    if stage != "enrolled" and not reason:
        return FailedPrecondition(
            Reason.REPLACE_REASON_REQUIRED,
            f"the device has been {stage}: replacing its enrollment needs a reason (replace_reason)",
            metadata={"stage": stage},
        )
    return None


def replace_detail(existing: Enrollment, reason: str, old_sha256: str | None, new_sha256: str) -> str:
    return (
        f"stage={stage_of(existing)} owner={existing.owner or '-'} "
        f"sha256={old_sha256 or '-'}->{new_sha256} reason={reason or '-'}"
    )


def _transfer_json(result: TransferResult) -> dict[str, Any]:
    return {
        "device_id": result.device_id,
        "owner": result.owner,
        "previous_owner": result.previous_owner,
        "changed": result.changed,
    }


async def _replayed(data: dict[str, Any]) -> TransferResult:
    return TransferResult(
        data["device_id"], data["owner"], data["previous_owner"], data["changed"], replayed=True
    )


class OwnershipService:
    """TransferOwnership: name another OEM as the owner of a device not activated yet."""

    def __init__(
        self,
        dps: EnrollmentPort,
        outbox: Outbox,
        clock: Clock,
        request_ids: RequestIds | None = None,
    ) -> None:
        self._dps = dps
        self._outbox = outbox
        self._clock = clock
        self._request_ids = request_ids or RequestIds(outbox.reservations)

    async def _stored(self, request_id: str) -> Stored[dict[str, Any]] | None:
        found = await self._outbox.find_request(request_id)
        return None if found is None else Stored(found[0], found[1])

    async def transfer(self, command: TransferCommand) -> TransferResult:
        check_request_id(command.request_id)
        device_id = normalise_device_id(command.device_id)
        owner = check_owner(command.owner, "owner_oem")
        if not owner:
            raise invalid_field("owner_oem", Reason.OWNER_MISSING, "name the OEM that is to own the device")
        reason = check_reason(command.reason, "reason")
        if not reason:
            raise invalid_field("reason", Reason.REASON_MISSING, "say why the device changes hands")
        request_fingerprint = fingerprint(["transfer", device_id, owner, reason])

        async def execute() -> TransferResult | LostRace:
            result = await self._transfer(device_id, owner)
            if result.changed:
                await self._outbox.record_audit(
                    AuditRecord(
                        self._clock(),
                        "transfer",
                        device_id,
                        str(command.caller),
                        command.request_id,
                        f"owner={result.previous_owner or '-'}->{owner} reason={reason}",
                    )
                )
                log.info("ownership transferred", extra={"owner": owner, "previous": result.previous_owner})
            if command.request_id and not await self._outbox.remember_request(
                command.request_id, request_fingerprint, _transfer_json(result)
            ):
                return LOST_RACE
            return result

        with bind_device_id(device_id):
            return await self._request_ids.run(
                command.request_id,
                request_fingerprint,
                find=lambda: self._stored(command.request_id),
                replay=_replayed,
                execute=execute,
            )

    async def _transfer(self, device_id: str, owner: str) -> TransferResult:
        with translating_cloud_errors(CloudService.DPS, refused="the update"):
            for _ in range(_MAX_ATTEMPTS):
                existing = await self._dps.get(device_id)
                if existing is None:
                    raise NotFound(Reason.ENROLLMENT_NOT_FOUND, f"{device_id} has no enrollment in DPS")
                previous = existing.owner or ""
                if previous == owner:
                    return TransferResult(device_id, owner, previous, False)
                stage = stage_of(existing)
                if stage != "enrolled":
                    raise FailedPrecondition(
                        Reason.DEVICE_ALREADY_ACTIVATED,
                        f"the device has been {stage}: it stays with its owner {previous or '(none)'}",
                        metadata={"stage": stage, "owner_oem": previous},
                    )
                try:
                    await self._dps.update(dc_replace(existing, owner=owner))
                except (CloudEtagMismatch, CloudNotFound):
                    continue
                return TransferResult(device_id, owner, previous, True)
        raise Aborted(
            SharedReason.ENROLLMENT_CONCURRENTLY_MODIFIED, f"the enrollment of {device_id} kept changing"
        )
