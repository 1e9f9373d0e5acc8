"""The external steps of an activation, driven by its recorded intent (``activation_svc.intents``).

``IntentSteps.run(intent, enrollment)`` carries out a freshly recorded intent; ``complete_open(device_id)``
finishes what a crash (or an unreachable service) left open: at start-up for every device, and before the
next call for one device.  Both go through ``carry_out``, which works from the intent alone:

1. **DPS**: when the enrollment already holds the intent's twin and hub (the write happened before the
   interruption, or someone wrote the very same), the step is done; when it still has the etag the intent
   was meant for, it is written now (etag-guarded); otherwise someone else changed the device first and the
   intent is abandoned, nothing of it written.
2. **Hub twin**, when the device has registered: the patch is computed from the intent's twin before and
   after (and the twin as it is now), so tags and properties the change removed are removed (set to null)
   on the hub, whichever run gets there.  An intent that KEEPS the metadata patches nothing (the hub
   twin's tags and desired properties stay as they are, changed on the hub since or not); like every
   intent it re-enables a hub identity a deactivation disabled.

Each step is marked in the intent as it completes, durably before the next external write; the marks of
the steps after which nothing more is written outside (the hub step, and the DPS step of a device not yet
registered) are written with the close, in its transaction (a crash before it finds the step done
again: the enrollment holds the intent, the hub twin needs no patch).  The intent's audit row gets its
outcome when it is closed (``ok`` / ``error`` with the reason).  An unreachable DPS or hub leaves the
intent open (its audit row ``pending``, saying why) for the next attempt; a refusal closes it as ``error``.

Crash points for the fault-injection tests (``provkit.faults``): ``activate.after_intent``,
``activate.after_dps`` (DPS written, not yet marked), ``activate.after_hub`` (hub written, not marked).

Also here: the DPS and hub calls with their errors mapped to the domain's (``get_enrollment``,
``update_enrollment``, ``hub_errors()``, all through ``provkit.cloud_errors``) and
``holds(enrollment, twin, hubs)``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any

from activation_svc.audit import AuditEntry, AuditLog
from activation_svc.errors import Reason
from activation_svc.intents import ActivationIntent
from activation_svc.model import ActivationPath, MetadataChange
from provkit.clock import Clock
from provkit.cloud import (
    CloudEtagMismatch,
    CloudNotFound,
    Enrollment,
    EnrollmentPort,
    HubAllocation,
    HubDeviceStatus,
    HubTwinPort,
    InitialTwin,
    ProvisioningStatus,
    TwinPatch,
)
from provkit.cloud_errors import CloudService, translating_cloud_errors
from provkit.errors import Aborted, DomainError, ErrorKind
from provkit.faults import crash_point

log = logging.getLogger("activation_svc.steps")

_MAX_ATTEMPTS = 16


async def get_enrollment(dps: EnrollmentPort, device_id: str) -> Enrollment | None:
    with translating_cloud_errors(CloudService.DPS):
        return await dps.get(device_id)


async def update_enrollment(dps: EnrollmentPort, enrollment: Enrollment) -> Enrollment | None:
    """None on an etag mismatch (someone changed it meanwhile)."""
    with translating_cloud_errors(CloudService.DPS, refused="the update"):
        try:
            return await dps.update(enrollment)
        except (CloudEtagMismatch, CloudNotFound):
            return None


def hub_errors() -> contextlib.AbstractContextManager[None]:
    """A hub call's failures as the domain's: HUB_UNAVAILABLE (retry later), HUB_REFUSED."""
    return translating_cloud_errors(CloudService.HUB, refused="the update")


def holds(enrollment: Enrollment, twin: InitialTwin, hubs: HubAllocation) -> bool:
    """The enrollment is activated (not deactivated since) with exactly this twin and hub allocation."""
    record = enrollment.activation
    return (
        enrollment.enabled
        and enrollment.initial_twin == twin
        and enrollment.allocation == hubs
        and record.activated_at is not None
        and record.deactivated_at is None
    )


def registered_hub_of(enrollment: Enrollment | None) -> str:
    """The hub the device registered on ("" when it has not)."""
    registration = enrollment.registration_state if enrollment is not None else None
    return (registration.assigned_hub or "") if registration and registration.assigned else ""


def _changes(wanted: Any, old: Any, current: Any) -> dict[str, Any]:
    """The merge patch that turns ``current`` (a twin section) into ``wanted``: changed keys, and keys
    this side wrote earlier (in ``old``) that ``wanted`` no longer has (None deletes them)."""
    patch = {k: v for k, v in wanted.items() if current.get(k) != v}
    patch.update({k: None for k in old if k not in wanted and k in current})
    return patch


@dataclass
class _Progress:
    """The intent as its steps are marked (what a failure in the middle has completed)."""

    intent: ActivationIntent


@dataclass(frozen=True)
class Carried:
    """What running an intent's steps left: the enrollment and whether the hub twin was written."""

    enrollment: Enrollment | None
    twin_written: bool
    registered_hub: str

    @property
    def path(self) -> ActivationPath:
        return ActivationPath.ENROLLMENT_AND_HUB_TWIN if self.twin_written else ActivationPath.ENROLLMENT


class IntentSteps:
    def __init__(
        self, dps: EnrollmentPort, hubs: HubTwinPort, audit: AuditLog, clock: Clock
    ) -> None:
        self._dps = dps
        self._hubs = hubs
        self._audit = audit
        self._clock = clock
        self._running: set[int] = set()  # intents a task of this process is carrying out

    async def record(self, intent: ActivationIntent, entry: AuditEntry) -> ActivationIntent:
        recorded = await self._audit.begin_intent(intent, entry)
        crash_point("activate.after_intent")
        return recorded

    # ------------------------------------------------------------------------------------- running
    async def run(self, intent: ActivationIntent, enrollment: Enrollment | None) -> Carried | None:
        """Carry out a freshly recorded ``intent`` and close it; None when it was abandoned (someone else
        changed the enrollment first).  A refusal closes it as ``error``; anything else leaves it open
        (audit row ``pending``, saying why) and raises."""
        return await self._drive(intent, enrollment, "")

    async def complete_open(self, device_id: str | None = None, *, keep_going: bool = False) -> int:
        """Finish the open intents (of one device, or all) that no task of this process is running; how
        many were closed.  A failure leaves its intent open and propagates, unless ``keep_going`` (start-up)
        or it is not a domain error (logged): then the next intent is tried, or, when DPS or a hub cannot
        be reached, none (start-up is not held up; the next call for each device tries again)."""
        closed = 0
        for intent in await self._audit.intents.open_intents(device_id):
            if intent.id in self._running or not await self._audit.intents.hold(intent):
                continue  # this process or another replica is carrying it out
            log.info("completing an interrupted activation", extra={"intent": intent.id})
            try:
                await self._drive(intent, None, " (completed after an interruption)")
            except DomainError as exc:
                if not keep_going:
                    raise
                log.warning("interrupted activation not completed yet", extra={"reason": exc.reason})
                if exc.kind is ErrorKind.UNAVAILABLE:
                    break  # DPS or a hub is away: the next call for each device finishes the rest
                continue
            except Exception:
                log.exception("interrupted activation not completed", extra={"intent": intent.id})
                continue
            closed += 1
        return closed

    async def _drive(
        self, intent: ActivationIntent, enrollment: Enrollment | None, note: str
    ) -> Carried | None:
        self._running.add(intent.id)
        progress = _Progress(intent)
        try:
            try:
                carried = await self.carry_out(progress, enrollment)
            except Exception as exc:
                intent = progress.intent
                reason = exc.reason if isinstance(exc, DomainError) else type(exc).__name__
                if isinstance(exc, DomainError) and exc.kind is ErrorKind.FAILED_PRECONDITION:
                    done = "enrollment written, " if intent.dps_done else ""
                    await self._close(
                        intent, False, "error", f"{reason}: {done}not completed; {intent.summary}"
                    )
                else:
                    await self._audit.intents.note(intent, f"pending ({reason}): {intent.summary}")
                    await self._audit.intents.let_go(intent)
                raise
            intent = progress.intent
            if carried is None:
                detail = f"ENROLLMENT_CHANGED_CONCURRENTLY: nothing written; {intent.summary}"
                await self._close(intent, False, "error", detail)
                return None
            await self._close(intent, True, "ok", f"path={carried.path.value} {intent.summary}{note}")
            return carried
        finally:
            self._running.discard(intent.id)

    async def _close(self, intent: ActivationIntent, done: bool, outcome: str, detail: str) -> None:
        await self._audit.intents.finish(intent, done, outcome, detail)
        log.info(
            "audit",
            extra={"action": "activate", "outcome": outcome, "caller": intent.caller, "detail": detail},
        )

    # --------------------------------------------------------------------------------------- steps
    async def carry_out(self, progress: _Progress, enrollment: Enrollment | None) -> Carried | None:
        """The intent's remaining steps, each marked in ``progress`` as done; None: abandoned (the
        enrollment holds another change than this one, which wrote nothing)."""
        intent = progress.intent
        hubs = HubAllocation((intent.hub,), "static")
        if not intent.dps_done:
            current = enrollment or await get_enrollment(self._dps, intent.device_id)
            for _ in range(2):  # as read; once more after a 412, to tell "the same" from "another"
                if current is None:
                    return None
                if holds(current, intent.after, hubs):
                    break
                if current.etag != intent.basis_etag:
                    return None
                written = await update_enrollment(self._dps, self._activated(current, intent))
                if written is not None:
                    current = written
                    crash_point("activate.after_dps")
                    break
                current = await get_enrollment(self._dps, intent.device_id)
            else:
                return None
            enrollment = current
            intent = progress.intent = dc_replace(intent, dps_etag=current.etag or "")
            if not intent.hub_done and registered_hub_of(enrollment):
                # marked durably before the hub write; without one, the close writes the mark
                intent = progress.intent = await self._audit.intents.mark_dps(intent, current.etag or "")
        elif enrollment is None:
            enrollment = await get_enrollment(self._dps, intent.device_id)
        registered_hub = registered_hub_of(enrollment)
        twin_written = False
        if not intent.hub_done:
            if registered_hub:
                wanted = None if intent.metadata is MetadataChange.KEPT else intent.after
                twin_written = await self.sync_hub(registered_hub, intent.device_id, wanted, intent.before)
                crash_point("activate.after_hub")
            progress.intent = dc_replace(intent, hub_done=True)  # the last step: the close marks it
        return Carried(enrollment, twin_written, registered_hub)

    def _activated(self, enrollment: Enrollment, intent: ActivationIntent) -> Enrollment:
        return dc_replace(
            enrollment,
            initial_twin=intent.after,
            allocation=HubAllocation((intent.hub,), "static"),
            provisioning_status=ProvisioningStatus.ENABLED,
            activation=dc_replace(enrollment.activation, activated_at=self._clock(), deactivated_at=None),
            owner=enrollment.owner or intent.owner or None,  # the first activation claims the device
        )

    async def sync_hub(
        self, hub: str, device_id: str, wanted: InitialTwin | None, previous: InitialTwin | None
    ) -> bool:
        """Merge the metadata into the device's hub twin (and re-enable a disabled identity): keys of
        ``previous`` that ``wanted`` no longer has are removed.  ``wanted`` None: the twin is left alone
        (the metadata is kept), only the identity is re-enabled."""
        old = previous or InitialTwin()
        with hub_errors():
            for _ in range(_MAX_ATTEMPTS):
                device = await self._hubs.get_device(hub, device_id)
                if device is None:
                    return False
                wrote = False
                if device.status is not HubDeviceStatus.ENABLED:
                    try:
                        await self._hubs.set_device_status(hub, device, HubDeviceStatus.ENABLED)
                    except CloudEtagMismatch:
                        continue
                    wrote = True
                if wanted is None:
                    return wrote
                twin = await self._hubs.get_twin_document(hub, device_id)
                if twin is None:
                    return wrote
                patch = TwinPatch(
                    _changes(wanted.tags, old.tags, twin.tags),
                    _changes(wanted.desired, old.desired, twin.desired),
                )
                if not patch:
                    return wrote
                try:
                    await self._hubs.patch_twin(hub, device_id, patch, twin.etag or "*")
                except CloudEtagMismatch:
                    continue
                return True
        raise Aborted(Reason.HUB_TWIN_CONCURRENTLY_MODIFIED, "the hub twin kept changing; try again")
