"""Activate, Deactivate and GetDeviceStatus: the activation domain (no gRPC, no Azure SDK).

Authorisation: the device's enrollment must hold the hash of the presented activation code
(``provkit.activation_code``), and when the enrollment names an owner OEM the caller must act for it
(``Caller.oem``: the OEM itself, or a portal for it; in-process callers are not parties and pass).
Unknown device, missing or wrong code, another OEM's device -> PermissionDenied ACTIVATION_DENIED, the
same answer, the same work and the same count in the limiter either way: ownership cannot be probed.
Failed checks are limited per (caller, device) with a growing back-off (``activation_svc.ratelimit``;
who counts as one caller: ``_attempt_key``), never per device over all callers, so nobody can use up the
owner's attempts -> ResourceExhausted ACTIVATION_RATE_LIMITED (with retry_after).
GetDeviceStatus needs no code from the OEM that owns the device (its own back office, ``Role.OEM``, not a
portal: a portal serves whoever holds a label): its identity suffices.  Without a code anyone else - another
OEM, a portal, a caller on a device nobody owns yet - gets exactly what a wrong code gets (the same
answer, counted the same way), so asking without a code tells them nothing new.
The caller is the ``provkit.context.Caller`` the server resolved from the client certificate.

The metadata: none sent KEEPS the device's (the enrollment's initial twin stays; its hub twin's tags and
desired properties are not touched), metadata sent REPLACES it, ``clear_metadata`` CLEARS it
(``activation_svc.metadata.requested_metadata``); the answer says which (``ActivateResult.metadata_change``).
Metadata without tags and desired properties never clears a device that has some: METADATA_EMPTY.

Activate writes ONE etag-guarded enrollment update: initialTwin = the metadata, iotHubs = [hub],
allocationPolicy = static, provisioningStatus = enabled, and the owner (the caller's OEM, when none was
named: the first activation claims the device).  The update is guarded by the etag the call read (or the
``expected_etag`` the caller names): when the enrollment changed meanwhile and does not hold this very
metadata, the call is Aborted ENROLLMENT_CHANGED_CONCURRENTLY and writes nothing (the caller reads the new
state and decides again); never does one writer silently overwrite another.  When the device has
registered already, the metadata is also merged into its hub twin (etag-guarded as well).

A change is a recorded intent (``activation_svc.intents``, carried out by ``activation_svc.steps``):
written durably with its audit row before the first external write, each step marked as it completes,
and what a crash leaves open is finished at start-up (``complete_open_intents``) and before the next call
for that device.  The hub twin patch comes from the intent (twin before and after), so what a change
removes is removed on the hub too.

Request ids go through ``provkit.idempotency`` (answers kept in the audit database; replicas reserve an id
there before the work, and wait for, or take over, each other's).  The domain reads and
writes ``provkit.cloud.Enrollment`` records (activation record, initial twin, hub allocation); the DPS
JSON is the adapter's.

Reasons: ``activation_svc.errors.Reason`` (this service's) and ``provkit.errors.Reason`` (DEVICE_ID_*,
REQUEST_ID_*, DPS_/HUB_UNAVAILABLE and _REFUSED through ``provkit.cloud_errors``, ...), each with its
meaning; the table of reasons in docs/error-reasons.md is rendered from them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass
from dataclasses import replace as dc_replace
from typing import Any, Protocol

from activation_svc.audit import AuditEntry, AuditLog
from activation_svc.errors import Reason
from activation_svc.intents import ActivationIntent
from activation_svc.metadata import MetadataRequest, TwinMetadata, requested_metadata, target_twin
from activation_svc.model import (
    ActivateCommand,
    ActivateResult,
    ActivationPath,
    DeactivateCommand,
    DeactivateResult,
    DeviceStatus,
    Lifecycle,
    MetadataChange,
)
from activation_svc.ratelimit import AttemptsExhausted, FailureLimits
from activation_svc.steps import (
    IntentSteps,
    get_enrollment,
    holds,
    hub_errors,
    registered_hub_of,
    update_enrollment,
)
from activation_svc.templates.schema import Template, Templates
from provkit.activation_code import normalise as normalise_code
from provkit.activation_code import verify_code
from provkit.clock import Clock
from provkit.cloud import (
    CloudUnavailable,
    Enrollment,
    EnrollmentPort,
    HubAllocation,
    HubDevice,
    HubTwinPort,
    ProvisioningStatus,
    disable_hub_device,
)
from provkit.cloud_errors import CloudService, cloud_unavailable
from provkit.context import Caller, Role, bind_device_id
from provkit.device_id import normalise_device_id
from provkit.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
    invalid_field,
)
from provkit.errors import Reason as SharedReason
from provkit.idempotency import LOST_RACE, LostRace, RequestIds, Stored, check_request_id, fingerprint

log = logging.getLogger("activation_svc")

_MAX_ATTEMPTS = 16


class HubSelection(Protocol):
    @property
    def hub_names(self) -> tuple[str, ...]: ...

    @property
    def default_hub(self) -> str | None: ...


def _denied() -> PermissionDenied:
    return PermissionDenied(Reason.ACTIVATION_DENIED, "unknown device or wrong activation code")


def _code_hash(enrollment: Enrollment | None) -> Any:
    return enrollment.code_hash if enrollment is not None else None


def _answers_to(enrollment: Enrollment | None, caller: Caller) -> bool:
    """Whether the device answers to ``caller``: it has no owner yet, or the caller acts for its owner."""
    if enrollment is None or enrollment.owner is None or caller.role is Role.INTERNAL:
        return True
    return caller.oem == enrollment.owner


def _attempt_key(caller: Caller, enrollment: Enrollment | None) -> str:
    """Whose budget of wrong codes a check spends (``activation_svc.ratelimit``, per key and device).

    A party's certificate is one budget (its role and tenant).  A portal serves many people and names the
    one it acts for (``Caller.on_behalf_of``): each gets a budget of their own, so one person's guessing
    never blocks another's right code - but only on a device the portal may act on: its OEM's, or one that
    nobody owns yet (the first activation claims it).  On any other id, another OEM's device or an id that
    does not exist (the two must look alike), the names it gives are not counted apart and the whole
    certificate shares one budget: naming end users multiplies nothing there.
    """
    if caller.on_behalf_of and enrollment is not None and enrollment.owner in (None, caller.oem):
        return f"{caller.uri} {caller.on_behalf_of}"
    return caller.uri


def _changed_meanwhile(enrollment: Enrollment) -> Aborted:
    return Aborted(
        Reason.ENROLLMENT_CHANGED_CONCURRENTLY,
        "the device's enrollment changed since this call read it (another activation?); "
        "read its status and activate again against the new state",
        metadata={"enrollment_etag": enrollment.etag or ""},
    )


@dataclass
class _Trail:
    """Whether this call's audit row exists already (written with its intent)."""

    intent_recorded: bool = False


class ActivationService:
    def __init__(
        self,
        dps: EnrollmentPort,
        hubs: HubTwinPort,
        selection: HubSelection,
        limits: FailureLimits,
        audit: AuditLog,
        clock: Clock,
        request_ids: RequestIds | None = None,
        *,
        templates: Templates | None = None,
    ) -> None:
        self._dps = dps
        self._hubs = hubs
        self._selection = selection
        self._limits = limits
        self._audit = audit
        self._clock = clock
        self._request_ids = request_ids or RequestIds(audit.reservations)
        self._steps = IntentSteps(dps, hubs, audit, clock)
        self._templates = templates or Templates()

    def template_for(self, caller: Caller) -> Template | None:
        """The metadata template the caller's OEM must follow (None: the twin rules only)."""
        return self._templates.for_caller(caller)

    async def complete_open_intents(self) -> int:
        """Start-up: finish every activation a crash left open (how many were closed).  One that cannot be
        finished now (DPS or hub unreachable) stays open for the next call for its device."""
        return await self._steps.complete_open(keep_going=True)

    # ------------------------------------------------------------------------------------ helpers
    async def _audit_entry(
        self, action: str, device_id: str, caller: str, request_id: str, outcome: str, detail: str = ""
    ) -> None:
        await self._audit.record(
            AuditEntry(self._clock(), action, device_id, caller, request_id, outcome, detail)
        )
        log.info("audit", extra={"action": action, "outcome": outcome, "caller": caller, "detail": detail})

    async def _get(self, device_id: str) -> Enrollment | None:
        return await get_enrollment(self._dps, device_id)

    async def _authorised(
        self,
        action: str,
        raw_id: str,
        code: str,
        caller: Caller,
        request_id: str,
        *,
        owner_suffices: bool = False,
    ) -> tuple[str, Enrollment]:
        """The normalised id and its enrollment, or PermissionDenied / ResourceExhausted.  With
        ``owner_suffices`` and no code, the OEM that owns the device passes on its identity alone."""
        device_id = normalise_device_id(raw_id)
        if code and normalise_code(code) is None:  # a typo, not a guess: refused before any budget is used
            raise invalid_field(
                "activation_code",
                Reason.ACTIVATION_CODE_MALFORMED,
                "that is not an activation code: it has 16 letters and digits, printed in four groups like "
                "7K3M-Q9XD-2HPA-W4RT",
            )
        # A portal's end users get budgets of their own only on a device it may act on, which needs the
        # enrollment first; everyone else's budget is known without it (no DPS read when refused).
        by_owner = owner_suffices and not code and caller.role is Role.OEM
        read_first = bool(caller.on_behalf_of) or by_owner
        enrollment = await self._get(device_id) if read_first else None
        if (
            by_owner
            and enrollment is not None
            and enrollment.owner is not None
            and _answers_to(enrollment, caller)
        ):
            return device_id, await self._finished(device_id, enrollment)
        try:
            slot = await self._limits.begin(_attempt_key(caller, enrollment), device_id)
        except AttemptsExhausted as exc:
            await self._audit_entry(action, device_id, str(caller), request_id, "rate-limited")
            raise ResourceExhausted(
                Reason.ACTIVATION_RATE_LIMITED,
                "too many failed attempts for this device; try again later",
                retry_after=exc.retry_after,
            ) from None
        try:
            if not read_first:
                enrollment = await self._get(device_id)
            right_code = await asyncio.to_thread(verify_code, code or "", _code_hash(enrollment))
            if not right_code or not _answers_to(enrollment, caller):
                await slot.failed()
                detail = "" if right_code else "wrong code or unknown device"
                await self._audit_entry(
                    action, device_id, str(caller), request_id, "denied", detail or "not the owner"
                )
                raise _denied()
            await slot.succeeded()
        finally:
            await slot.release()
        assert enrollment is not None
        return device_id, await self._finished(device_id, enrollment)

    async def _finished(self, device_id: str, enrollment: Enrollment) -> Enrollment:
        """The enrollment once a change a crash interrupted is finished (that comes first)."""
        if await self._steps.complete_open(device_id):
            found = await self._get(device_id)
            if found is None:
                raise _denied()
            return found
        return enrollment

    def _hub(self, requested: str) -> str:
        names = self._selection.hub_names
        if not requested:
            if not self._selection.default_hub:
                raise FailedPrecondition(Reason.HUB_NOT_CONFIGURED, "no linked IoT hub is configured")
            return self._selection.default_hub
        for name in names:
            if name.lower() == requested.strip().lower():
                return name
        raise invalid_field(
            "hub", Reason.HUB_UNKNOWN, f"{requested!r} is not a linked hub (known: {', '.join(names)})"
        )

    async def _stored(self, request_id: str) -> Stored[dict[str, Any]] | None:
        found = await self._audit.find_request(request_id)
        return None if found is None else Stored(found[0], json.loads(found[1]))

    async def _remember(self, request_id: str, fingerprint: str, result: Any) -> bool:
        """Store the answer; False when the id had one already (a replica that took it over answered)."""
        if not request_id:
            return True
        data = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(result).items()}
        return await self._audit.remember_request(request_id, fingerprint, json.dumps(data, default=str))

    async def _update(self, enrollment: Enrollment) -> Enrollment | None:
        """None on an etag mismatch (someone changed it: read again)."""
        return await update_enrollment(self._dps, enrollment)

    async def _reauthorise(self, device_id: str, code: str, caller: Caller) -> Enrollment:
        enrollment = await self._get(device_id)
        if enrollment is None or not await asyncio.to_thread(verify_code, code, _code_hash(enrollment)):
            raise _denied()  # the code was rotated (or the enrollment deleted) meanwhile
        if not _answers_to(enrollment, caller):
            raise _denied()  # another OEM claimed it meanwhile
        return enrollment

    # ----------------------------------------------------------------------------------- activate
    async def activate(self, cmd: ActivateCommand) -> ActivateResult:
        check_request_id(cmd.request_id)
        metadata = requested_metadata(cmd.metadata_json, cmd.clear_metadata)
        template = self.template_for(cmd.caller)
        if template is not None and metadata.change is not MetadataChange.KEPT:
            sent = metadata.metadata or TwinMetadata({}, {})  # cleared: no tags, no desired properties
            template.check(sent.tags, sent.desired)
        hub = self._hub(cmd.hub)
        device_id, enrollment = await self._authorised(
            "activate", cmd.device_id, cmd.activation_code, cmd.caller, cmd.request_id
        )
        expected = cmd.expected_etag.strip()
        request_fingerprint = fingerprint(
            ["activate", device_id, metadata.fingerprint(), hub, *([expected] if expected else [])]
        )
        summary = f"hub={hub} {metadata.summary()}"

        async def execute() -> ActivateResult | LostRace:
            trail = _Trail()
            try:
                result = await self._activate(device_id, enrollment, metadata, hub, cmd, summary, trail)
            except Exception as exc:
                if not trail.intent_recorded:  # else the intent's audit row says it
                    why = exc.reason if isinstance(exc, DomainError) else type(exc).__name__
                    await self._audit_entry(
                        "activate", device_id, str(cmd.caller), cmd.request_id, "error", why
                    )
                raise
            if not trail.intent_recorded:
                await self._audit_entry(
                    "activate",
                    device_id,
                    str(cmd.caller),
                    cmd.request_id,
                    "ok",
                    f"path={result.path.value} {summary}",
                )
            if not await self._remember(cmd.request_id, request_fingerprint, result):
                return LOST_RACE
            return result

        with bind_device_id(device_id):
            return await self._request_ids.run(
                cmd.request_id,
                request_fingerprint,
                find=lambda: self._stored(cmd.request_id),
                replay=_replayed_activation,
                execute=execute,
            )

    async def _activate(
        self,
        device_id: str,
        enrollment: Enrollment,
        metadata: MetadataRequest,
        hub: str,
        cmd: ActivateCommand,
        summary: str,
        trail: _Trail,
    ) -> ActivateResult:
        # The target comes from what this call read (the intent records it): kept, replaced or cleared.
        wanted_twin = target_twin(metadata, enrollment.initial_twin)
        change = metadata.change
        template = self.template_for(cmd.caller)
        first = enrollment.activation.activated_at is None
        if template is not None and change is MetadataChange.KEPT and first:
            # a first activation that keeps what the enrollment holds must still meet the template
            template.check(wanted_twin.tags, wanted_twin.desired)
        registered_hub = registered_hub_of(enrollment)
        if holds(enrollment, wanted_twin, HubAllocation((hub,), "static")):
            twin_written = False
            if registered_hub:  # the twin may have drifted from the enrollment: bring it back (unless kept)
                on_hub = None if change is MetadataChange.KEPT else wanted_twin
                twin_written = await self._steps.sync_hub(registered_hub, device_id, on_hub, wanted_twin)
            path = ActivationPath.ENROLLMENT_AND_HUB_TWIN if twin_written else ActivationPath.UNCHANGED
            return self._result(device_id, hub, path, enrollment, registered_hub, change)
        basis = cmd.expected_etag.strip() or enrollment.etag or ""  # the state this change is meant for
        if enrollment.etag != basis:
            raise _changed_meanwhile(enrollment)
        intent = ActivationIntent(
            device_id=device_id,
            caller=str(cmd.caller),
            request_id=cmd.request_id,
            hub=hub,
            before=enrollment.initial_twin,
            after=wanted_twin,
            owner=cmd.caller.oem or "",
            basis_etag=basis,
            summary=summary,
            metadata=change,
        )
        entry = AuditEntry(
            self._clock(),
            "activate",
            device_id,
            str(cmd.caller),
            cmd.request_id,
            "pending",
            f"intent {summary}",
        )
        intent = await self._steps.record(intent, entry)
        trail.intent_recorded = True
        carried = await self._steps.run(intent, enrollment)
        if carried is None:
            raise _changed_meanwhile(await self._get(device_id) or enrollment)
        return self._result(
            device_id, hub, carried.path, carried.enrollment or enrollment, carried.registered_hub, change
        )

    def _result(
        self,
        device_id: str,
        hub: str,
        path: ActivationPath,
        enrollment: Enrollment,
        registered_hub: str,
        change: MetadataChange,
    ) -> ActivateResult:
        lifecycle = Lifecycle.REGISTERED if registered_hub else Lifecycle.ACTIVATED
        log.info("activated", extra={"path": path.value, "hub": hub, "metadata": change.value})
        etag, owner = enrollment.etag or "", enrollment.owner or ""
        return ActivateResult(
            device_id, hub, path, lifecycle, etag, registered_hub, owner=owner, metadata_change=change
        )

    # --------------------------------------------------------------------------------- deactivate
    async def deactivate(self, cmd: DeactivateCommand) -> DeactivateResult:
        check_request_id(cmd.request_id)
        device_id, enrollment = await self._authorised(
            "deactivate", cmd.device_id, cmd.activation_code, cmd.caller, cmd.request_id
        )
        request_fingerprint = fingerprint(["deactivate", device_id])

        async def execute() -> DeactivateResult | LostRace:
            result = await self._deactivate(device_id, enrollment, cmd.activation_code, cmd.caller)
            await self._audit_entry(
                "deactivate", device_id, str(cmd.caller), cmd.request_id, "ok", f"changed={result.changed}"
            )
            if not await self._remember(cmd.request_id, request_fingerprint, result):
                return LOST_RACE
            return result

        with bind_device_id(device_id):
            return await self._request_ids.run(
                cmd.request_id,
                request_fingerprint,
                find=lambda: self._stored(cmd.request_id),
                replay=_replayed_deactivation,
                execute=execute,
            )

    async def _deactivate(
        self, device_id: str, enrollment: Enrollment, code: str, caller: Caller
    ) -> DeactivateResult:
        changed = False
        for _ in range(_MAX_ATTEMPTS):
            record = enrollment.activation
            if not enrollment.enabled and record.deactivated_at is not None:
                break
            if not enrollment.enabled and record.activated_at is None:
                break  # never activated: nothing to deprovision
            registration = enrollment.registration_state
            if registration is not None and registration.assigned_hub:
                record = dc_replace(record, registered_hub=registration.assigned_hub)
            deactivated = dc_replace(
                enrollment,
                provisioning_status=ProvisioningStatus.DISABLED,
                activation=dc_replace(record, deactivated_at=self._clock()),
            )
            updated = await self._update(deactivated)
            if updated is not None:
                enrollment, changed = updated, True
                break
            enrollment = await self._reauthorise(device_id, code, caller)
        else:
            raise Aborted(
                SharedReason.ENROLLMENT_CONCURRENTLY_MODIFIED, "the enrollment kept changing; try again"
            )
        hub_disabled = await self._disable_on_hub(enrollment, device_id)
        lifecycle = (
            Lifecycle.DEPROVISIONED if enrollment.activation.activated_at is not None else Lifecycle.ENROLLED
        )
        return DeactivateResult(device_id, changed or hub_disabled, hub_disabled, lifecycle)

    async def _disable_on_hub(self, enrollment: Enrollment, device_id: str) -> bool:
        registration = enrollment.registration_state
        hub = (registration.assigned_hub if registration else None) or enrollment.activation.registered_hub
        if not hub:
            return False
        with hub_errors():
            disabled = await disable_hub_device(self._hubs, hub, device_id, _MAX_ATTEMPTS)
            if disabled is not None:
                return disabled
        raise Aborted(
            SharedReason.HUB_DEVICE_CONCURRENTLY_MODIFIED, "the hub device kept changing; try again"
        )

    # ------------------------------------------------------------------------------------- status
    async def status(self, raw_id: str, code: str, caller: Caller | None = None) -> DeviceStatus:
        caller = caller or Caller.internal()
        device_id, enrollment = await self._authorised(
            "status", raw_id, code, caller, "", owner_suffices=True
        )
        record = enrollment.activation
        registration = enrollment.registration_state
        device: HubDevice | None = None
        hub = (registration.assigned_hub if registration else None) or record.registered_hub or ""
        if hub:
            try:
                device = await self._hubs.get_device(hub, device_id)
            except CloudUnavailable as exc:
                # only unreachable is translated here: a refusal of this read stays INTERNAL as it was
                raise cloud_unavailable(exc, CloudService.HUB) from exc
        activated = record.activated_at is not None
        if not enrollment.enabled:
            lifecycle = Lifecycle.DEPROVISIONED if activated else Lifecycle.ENROLLED
        elif device is not None and registration is not None and registration.assigned:
            lifecycle = Lifecycle.REGISTERED
        else:
            lifecycle = Lifecycle.ACTIVATED
        moments = [
            device.last_activity if device else None,
            registration.last_updated if registration else None,
            enrollment.last_updated,
        ]
        known = [m for m in moments if m is not None]
        hubs = enrollment.allocation.iot_hubs
        return DeviceStatus(
            device_id=device_id,
            lifecycle=lifecycle,
            provisioning_status=enrollment.provisioning_status.value,
            allocated_hub=hubs[0] if hubs and activated else "",
            registered_hub=hub if device else "",
            hub_device_status=device.status.value if device else "",
            hub_connection_state=device.connection_state if device else "",
            last_activity=max(known) if known else None,
            activated_at=record.activated_at,
            deactivated_at=record.deactivated_at,
            owner=enrollment.owner or "",
            enrollment_etag=enrollment.etag or "",
        )


async def _replayed_activation(earlier: dict[str, Any]) -> ActivateResult:
    return ActivateResult(
        earlier["device_id"],
        earlier["hub"],
        ActivationPath(earlier["path"]),
        Lifecycle(earlier["lifecycle"]),
        earlier["enrollment_etag"],
        earlier["registered_hub"],
        replayed=True,
        owner=earlier.get("owner", ""),
        metadata_change=MetadataChange(earlier.get("metadata_change", MetadataChange.REPLACED.value)),
    )


async def _replayed_deactivation(earlier: dict[str, Any]) -> DeactivateResult:
    return DeactivateResult(
        earlier["device_id"],
        earlier["changed"],
        earlier["hub_device_disabled"],
        Lifecycle(earlier["lifecycle"]),
        replayed=True,
    )
