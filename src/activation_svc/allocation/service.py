"""The allocation decision: "is this device activated, for which hub, with which twin", answered from the
same records Activate writes (in group mode, ``provkit.registry.DeviceRegistry``).

``AllocationService.allocate(query, caller)`` answers ``Allocated`` (the hub the OEM chose and the
activation's tags and desired properties) or raises ``AllocationRefused`` with its reason.  The checks, in
order, each refusal audited (action ``allocate``, outcome ``refused``, detail = the reason):

1. the registration id is the CN of the certificate DPS verified (REGISTRATION_ID_MISMATCH): DPS itself
   checks this for an X.509 group, the webhook does not rely on it;
2. a record exists (DEVICE_UNKNOWN) and holds that very certificate, by SHA-256 thumbprint, in its primary
   or (during a renewal) secondary slot (CERTIFICATE_NOT_ENROLLED: an older or foreign certificate);
3. the record is enabled: a record the factory revoked has no activation code any more (DEVICE_REVOKED),
   one the OEM deactivated has its deactivation time (DEVICE_DEPROVISIONED), any other disabled one was
   never activated (DEVICE_NOT_ACTIVATED);
4. its hub is one of the request's ``linkedHubs`` (HUB_NOT_LINKED: a configuration mistake, never another
   hub instead).

Then the hub is recorded as the device's registration (``record_assignment``: Activate and the status
see the device as registered, and later metadata changes reach its hub twin; skipped when the record read
says the device is on that hub already: a re-registration, DPS's retry) and the allocation is audited
(outcome ``ok``), in that order, each durable before the answer.  A registry that cannot be read raises
``CloudUnavailable`` (audited as REGISTRY_UNAVAILABLE when the audit can be written): the caller answers
5xx, never a hub.

Two commits, in two databases: the registry's (shared with factory_svc, ``registry.database_url``) and the
audit's (activation_svc's own), so they cannot be one transaction; each groups the writes of concurrent
allocations into shared commits instead.  Killed between them (crash point ``allocate.assigned``) the
registry says the device is on its hub and no ``ok`` row exists: nothing was answered, and DPS's retry (or
the device's next registration) allocates it again, with one commit, the audit row.  Killed after both
(``allocate.recorded``), before the answer: the same retry answers the same hub.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Protocol

from activation_svc.allocation.model import (
    Allocated,
    AllocationQuery,
    AllocationReason,
    common_name,
)
from activation_svc.audit import AuditEntry, AuditLog
from provkit.authz import Refusal
from provkit.clock import Clock
from provkit.cloud import CloudUnavailable, Enrollment, slot_sha256
from provkit.faults import crash_point

log = logging.getLogger("activation_svc.allocation")

ACTION = "allocate"


class AllocationRecords(Protocol):
    async def get(self, registration_id: str) -> Enrollment | None: ...

    async def record_assignment(self, registration_id: str, hub: str) -> None: ...


class AllocationRefused(Exception):
    def __init__(self, reason: AllocationReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


def enrolled_thumbprints(record: Enrollment) -> set[str]:
    """The SHA-256 thumbprints of the certificates a record holds (primary and secondary slot)."""
    att = record.attestation
    found = {
        slot_sha256(att.certificate_pem, att.sha256_thumbprint),
        slot_sha256(att.secondary_pem, att.secondary_sha256_thumbprint),
    }
    return {t for t in found if t}


def refusal_reason(record: Enrollment) -> AllocationReason | None:
    """Why an enrolled device holding the right certificate is not allocated now (None: it is)."""
    if record.enabled:
        return None
    if record.code_hash is None:
        return AllocationReason.DEVICE_REVOKED
    if record.activation.deactivated_at is not None:
        return AllocationReason.DEVICE_DEPROVISIONED
    return AllocationReason.DEVICE_NOT_ACTIVATED


class AllocationService:
    def __init__(self, records: AllocationRecords, audit: AuditLog, clock: Clock) -> None:
        self._records = records
        self._audit = audit
        self._clock = clock

    def refusal(self, reason: AllocationReason, caller: str, source: str) -> Refusal:
        """A refusal of the webhook's endpoint before any record is read (``record_refusal`` audits it)."""
        return Refusal(self._clock(), ACTION, caller, "", "", "", reason.value, source)

    async def record_refusal(self, refusal: Refusal) -> None:
        """Audit a refusal, or a summary of its repeats (``provkit.refusal_audit``): detail = its reason,
        and for a summary "and N more like this between T1 and T2"."""
        note = f" {refusal.repeats_note}" if refusal.repeats else ""
        await self.audit(refusal.device_id, refusal.caller, "refused", refusal.reason + note, refusal.time)

    async def audit(
        self, device_id: str, caller: str, outcome: str, detail: str, at: datetime | None = None
    ) -> None:
        entry = AuditEntry(at or self._clock(), ACTION, device_id, caller, "", outcome, detail)
        await self._audit.record(entry)
        log.info("audit", extra={"action": ACTION, "outcome": outcome, "caller": caller, "detail": detail})

    async def _refuse(
        self, query: AllocationQuery, caller: str, reason: AllocationReason
    ) -> AllocationRefused:
        await self.audit(query.registration_id, caller, "refused", reason.value)
        return AllocationRefused(reason)

    async def allocate(self, query: AllocationQuery, caller: str) -> Allocated:
        cn = common_name(query.subject_name)
        if cn is None or cn.lower() != query.registration_id.lower():
            raise await self._refuse(query, caller, AllocationReason.REGISTRATION_ID_MISMATCH)
        try:
            record = await self._records.get(query.registration_id)
        except CloudUnavailable:
            await self._audit_unavailable(query, caller)
            raise
        if record is None:
            raise await self._refuse(query, caller, AllocationReason.DEVICE_UNKNOWN)
        if query.sha256_thumbprint not in enrolled_thumbprints(record):
            raise await self._refuse(query, caller, AllocationReason.CERTIFICATE_NOT_ENROLLED)
        reason = refusal_reason(record)
        hubs = record.allocation.iot_hubs
        if reason is None and not hubs:
            reason = AllocationReason.DEVICE_NOT_ACTIVATED
        if reason is not None:
            raise await self._refuse(query, caller, reason)
        linked = {h.lower(): h for h in query.linked_hubs}
        hub = linked.get(hubs[0].lower())
        if hub is None:
            raise await self._refuse(query, caller, AllocationReason.HUB_NOT_LINKED)
        state = record.registration_state
        if state is None or not state.assigned or state.assigned_hub != hub:
            try:
                await self._records.record_assignment(query.registration_id, hub)
            except CloudUnavailable:
                await self._audit_unavailable(query, caller)
                raise
            crash_point("allocate.assigned")  # the registry's commit done, the audit's not: nothing answered
        await self.audit(query.registration_id, caller, "ok", f"hub={hub}")
        crash_point("allocate.recorded")  # both durable, the answer not sent: DPS's retry gets the same hub
        twin = record.initial_twin
        return Allocated(hub, twin.tags if twin else {}, twin.desired if twin else {})

    async def _audit_unavailable(self, query: AllocationQuery, caller: str) -> None:
        try:
            await self.audit(
                query.registration_id, caller, "error", AllocationReason.REGISTRY_UNAVAILABLE.value
            )
        except Exception:  # the audit may live in the very database that failed: the log still says it
            log.exception("allocation audit not written")
