"""Activate, Deactivate and GetDeviceStatus: the activation domain (no gRPC, no Azure SDK).

Authorisation: the device's enrollment must hold the hash of the presented activation code
(``provkit.activation_code``).  Unknown device, missing or wrong code -> PermissionDenied
ACTIVATION_DENIED, the same answer and the same work either way.  Failed checks are limited per (caller,
device) with a growing back-off and per device with a higher ceiling (``activation_svc.ratelimit``) ->
ResourceExhausted ACTIVATION_RATE_LIMITED (with retry_after).  The caller is the ``provkit.context.Caller``
the server resolved from the client certificate.

Activate writes ONE etag-guarded enrollment update: initialTwin = the metadata, iotHubs = [hub],
allocationPolicy = static, provisioningStatus = enabled.  A concurrent change (412) makes this side read
again, re-check the code and apply its change on top: no write is lost.  When the device has registered
already, the metadata is also merged into its hub twin (etag-guarded as well).

Other reasons: DEVICE_ID_* (id rules), METADATA_INVALID / METADATA_NOT_JSON, HUB_UNKNOWN, REQUEST_ID_REUSED,
ENROLLMENT_CONCURRENTLY_MODIFIED, DPS_UNAVAILABLE, HUB_UNAVAILABLE, DPS_REFUSED, HUB_REFUSED.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import datetime
from typing import Any, Protocol

from activation_svc.audit import AuditEntry, AuditLog
from activation_svc.metadata import TwinMetadata, parse_metadata
from activation_svc.model import (
    ActivateCommand,
    ActivateResult,
    ActivationPath,
    DeactivateCommand,
    DeactivateResult,
    DeviceStatus,
    Lifecycle,
)
from activation_svc.ratelimit import AttemptLimiter, AttemptsExhausted
from factory_svc.device_id import normalise_device_id
from provkit.activation_code import CODE_RECORD_KEY, verify_code
from provkit.cloud import (
    CloudEtagMismatch,
    CloudNotFound,
    CloudRejected,
    CloudUnavailable,
    Enrollment,
    EnrollmentPort,
    HubDevice,
    HubTwinPort,
    parse_azure_time,
)
from provkit.context import Caller, bind_device_id
from provkit.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    invalid_field,
)

log = logging.getLogger("activation_svc")

Clock = Callable[[], datetime]
LIFECYCLE_KEY = "activation"
_MAX_ATTEMPTS = 16
_READ_ONLY = ("registrationState", "createdDateTimeUtc", "lastUpdatedDateTimeUtc")


class HubSelection(Protocol):
    @property
    def hub_names(self) -> tuple[str, ...]: ...

    @property
    def default_hub(self) -> str | None: ...


def _denied() -> PermissionDenied:
    return PermissionDenied("ACTIVATION_DENIED", "unknown device or wrong activation code")


def _unavailable(exc: CloudUnavailable, what: str) -> Unavailable:
    return Unavailable(
        f"{what}_UNAVAILABLE", f"{what} cannot be reached: {exc}", retry_after=exc.retry_after or 5.0
    )


def _strip_meta(section: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (section or {}).items() if not k.startswith("$")}


def _twin_of(enrollment: Enrollment) -> tuple[dict[str, Any], dict[str, Any]] | None:
    twin = enrollment.initial_twin
    if not twin:
        return None
    return _strip_meta(twin.get("tags")), _strip_meta((twin.get("properties") or {}).get("desired"))


def _lifecycle_record(enrollment: Enrollment) -> dict[str, Any]:
    value = enrollment.optional_device_information.get(LIFECYCLE_KEY)
    return dict(value) if isinstance(value, Mapping) else {}


def _when(record: Mapping[str, Any], key: str) -> datetime | None:
    value = record.get(key)
    return parse_azure_time(value) if isinstance(value, str) else None


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class ActivationService:
    def __init__(
        self,
        dps: EnrollmentPort,
        hubs: HubTwinPort,
        selection: HubSelection,
        limiter: AttemptLimiter,
        audit: AuditLog,
        clock: Clock,
    ) -> None:
        self._dps = dps
        self._hubs = hubs
        self._selection = selection
        self._limiter = limiter
        self._audit = audit
        self._clock = clock

    # ------------------------------------------------------------------------------------ helpers
    async def _audit_entry(
        self, action: str, device_id: str, caller: str, request_id: str, outcome: str, detail: str = ""
    ) -> None:
        await self._audit.record(
            AuditEntry(self._clock(), action, device_id, caller, request_id, outcome, detail)
        )
        log.info("audit", extra={"action": action, "outcome": outcome, "caller": caller, "detail": detail})

    async def _get(self, device_id: str) -> Enrollment | None:
        try:
            return await self._dps.get(device_id)
        except CloudUnavailable as exc:
            raise _unavailable(exc, "DPS") from exc
        except CloudRejected as exc:
            raise FailedPrecondition("DPS_REFUSED", f"DPS refused the request: {exc}") from exc

    async def _authorised(
        self, action: str, raw_id: str, code: str, caller: Caller, request_id: str
    ) -> tuple[str, Enrollment]:
        """The normalised id and its enrollment, or PermissionDenied / ResourceExhausted."""
        device_id = normalise_device_id(raw_id)
        try:
            attempt = await self._limiter.begin(caller.attempt_key, device_id)
        except AttemptsExhausted as exc:
            await self._audit_entry(action, device_id, str(caller), request_id, "rate-limited")
            raise ResourceExhausted(
                "ACTIVATION_RATE_LIMITED",
                "too many failed attempts for this device; try again later",
                retry_after=exc.retry_after,
            ) from None
        with attempt:
            enrollment = await self._get(device_id)
            record = enrollment.optional_device_information.get(CODE_RECORD_KEY) if enrollment else None
            if not await asyncio.to_thread(verify_code, code or "", record):
                attempt.failed()
                await self._audit_entry(action, device_id, str(caller), request_id, "denied")
                raise _denied()
            attempt.succeeded()
        assert enrollment is not None
        return device_id, enrollment

    def _hub(self, requested: str) -> str:
        names = self._selection.hub_names
        if not requested:
            if not self._selection.default_hub:
                raise FailedPrecondition("HUB_NOT_CONFIGURED", "no linked IoT hub is configured")
            return self._selection.default_hub
        for name in names:
            if name.lower() == requested.strip().lower():
                return name
        raise invalid_field(
            "hub", "HUB_UNKNOWN", f"{requested!r} is not a linked hub (known: {', '.join(names)})"
        )

    async def _replay(self, request_id: str, fingerprint: str) -> dict[str, Any] | None:
        if not request_id:
            return None
        found = await self._audit.find_request(request_id)
        if found is None:
            return None
        if found[0] != fingerprint:
            raise InvalidArgument(
                "REQUEST_ID_REUSED",
                "this request_id was used for a different request",
                metadata={"request_id": request_id},
            )
        return json.loads(found[1])

    async def _remember(self, request_id: str, fingerprint: str, result: Any) -> None:
        if request_id:
            data = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(result).items()}
            await self._audit.remember_request(request_id, fingerprint, json.dumps(data, default=str))

    async def _update(self, body: dict[str, Any], etag: str) -> Enrollment | None:
        """None on an etag mismatch (someone changed it: read again)."""
        try:
            return await self._dps.update(body, etag)
        except (CloudEtagMismatch, CloudNotFound):
            return None
        except CloudUnavailable as exc:
            raise _unavailable(exc, "DPS") from exc
        except CloudRejected as exc:
            raise FailedPrecondition("DPS_REFUSED", f"DPS refused the update: {exc}") from exc

    async def _reauthorise(self, device_id: str, code: str) -> Enrollment:
        enrollment = await self._get(device_id)
        record = enrollment.optional_device_information.get(CODE_RECORD_KEY) if enrollment else None
        if enrollment is None or not await asyncio.to_thread(verify_code, code, record):
            raise _denied()  # the code was rotated (or the enrollment deleted) meanwhile
        return enrollment

    # ----------------------------------------------------------------------------------- activate
    async def activate(self, cmd: ActivateCommand) -> ActivateResult:
        metadata = parse_metadata(cmd.metadata_json)
        hub = self._hub(cmd.hub)
        device_id, enrollment = await self._authorised(
            "activate", cmd.device_id, cmd.activation_code, cmd.caller, cmd.request_id
        )
        with bind_device_id(device_id):
            fingerprint = _fingerprint("activate", device_id, metadata.canonical(), hub)
            earlier = await self._replay(cmd.request_id, fingerprint)
            if earlier is not None:
                return ActivateResult(
                    earlier["device_id"],
                    earlier["hub"],
                    ActivationPath(earlier["path"]),
                    Lifecycle(earlier["lifecycle"]),
                    earlier["enrollment_etag"],
                    earlier["registered_hub"],
                    replayed=True,
                )
            try:
                result = await self._activate(device_id, enrollment, metadata, hub, cmd.activation_code)
            except Exception as exc:
                await self._audit_entry(
                    "activate", device_id, str(cmd.caller), cmd.request_id, "error", type(exc).__name__
                )
                raise
            digest = hashlib.sha256(metadata.canonical().encode()).hexdigest()
            await self._audit_entry(
                "activate",
                device_id,
                str(cmd.caller),
                cmd.request_id,
                "ok",
                f"path={result.path.value} hub={hub} metadata_sha256={digest}",
            )
            await self._remember(cmd.request_id, fingerprint, result)
            return result

    async def _activate(
        self, device_id: str, enrollment: Enrollment, metadata: TwinMetadata, hub: str, code: str
    ) -> ActivateResult:
        previous: tuple[dict[str, Any], dict[str, Any]] | None = None
        changed = False
        for _ in range(_MAX_ATTEMPTS):
            previous = _twin_of(enrollment)
            record = _lifecycle_record(enrollment)
            same = (
                enrollment.enabled
                and previous == (dict(metadata.tags), dict(metadata.desired))
                and enrollment.iot_hubs == (hub,)
                and enrollment.raw.get("allocationPolicy") == "static"
                and "activatedAt" in record
                and "deactivatedAt" not in record
            )
            if same:
                break
            body = enrollment.body()
            for key in _READ_ONLY:
                body.pop(key, None)
            body["initialTwin"] = metadata.initial_twin()
            body["iotHubs"] = [hub]
            body["allocationPolicy"] = "static"
            body.pop("iotHubHostName", None)
            body["provisioningStatus"] = "enabled"
            info = dict(body.get("optionalDeviceInformation") or {})
            record.pop("deactivatedAt", None)
            record["activatedAt"] = self._clock().isoformat()
            info[LIFECYCLE_KEY] = record
            body["optionalDeviceInformation"] = info
            updated = await self._update(body, enrollment.etag or "*")
            if updated is not None:
                enrollment, changed = updated, True
                break
            enrollment = await self._reauthorise(device_id, code)
        else:
            raise Conflict("ENROLLMENT_CONCURRENTLY_MODIFIED", "the enrollment kept changing; try again")
        registration = enrollment.registration_state
        twin_written = False
        registered_hub = ""
        if registration is not None and registration.assigned:
            registered_hub = registration.assigned_hub or ""
            twin_written = await self._sync_hub(registered_hub, device_id, metadata, previous)
        path = (
            ActivationPath.ENROLLMENT_AND_HUB_TWIN
            if twin_written
            else ActivationPath.ENROLLMENT
            if changed
            else ActivationPath.UNCHANGED
        )
        lifecycle = Lifecycle.REGISTERED if registered_hub else Lifecycle.ACTIVATED
        log.info("activated", extra={"path": path.value, "hub": hub})
        return ActivateResult(device_id, hub, path, lifecycle, enrollment.etag or "", registered_hub)

    async def _sync_hub(
        self,
        hub: str,
        device_id: str,
        metadata: TwinMetadata,
        previous: tuple[dict[str, Any], dict[str, Any]] | None,
    ) -> bool:
        """Merge the metadata into the device's hub twin (and re-enable a disabled identity)."""
        try:
            for _ in range(_MAX_ATTEMPTS):
                device = await self._hubs.get_device(hub, device_id)
                if device is None:
                    return False
                wrote = False
                if device.status != "enabled":
                    try:
                        await self._hubs.set_device_status(hub, device, "enabled")
                    except CloudEtagMismatch:
                        continue
                    wrote = True
                twin = await self._hubs.get_twin_document(hub, device_id)
                if twin is None:
                    return wrote
                old_tags, old_desired = previous or ({}, {})
                tags = {k: v for k, v in metadata.tags.items() if twin.tags.get(k) != v}
                tags.update({k: None for k in old_tags if k not in metadata.tags and k in twin.tags})
                desired = {k: v for k, v in metadata.desired.items() if twin.desired.get(k) != v}
                desired.update(
                    {k: None for k in old_desired if k not in metadata.desired and k in twin.desired}
                )
                if not tags and not desired:
                    return wrote
                try:
                    await self._hubs.patch_twin(hub, device_id, tags, desired, twin.etag or "*")
                except CloudEtagMismatch:
                    continue
                return True
        except CloudUnavailable as exc:
            raise _unavailable(exc, "HUB") from exc
        except CloudRejected as exc:
            raise FailedPrecondition("HUB_REFUSED", f"the IoT hub refused the update: {exc}") from exc
        raise Conflict("HUB_TWIN_CONCURRENTLY_MODIFIED", "the hub twin kept changing; try again")

    # --------------------------------------------------------------------------------- deactivate
    async def deactivate(self, cmd: DeactivateCommand) -> DeactivateResult:
        device_id, enrollment = await self._authorised(
            "deactivate", cmd.device_id, cmd.activation_code, cmd.caller, cmd.request_id
        )
        with bind_device_id(device_id):
            fingerprint = _fingerprint("deactivate", device_id)
            earlier = await self._replay(cmd.request_id, fingerprint)
            if earlier is not None:
                return DeactivateResult(
                    earlier["device_id"],
                    earlier["changed"],
                    earlier["hub_device_disabled"],
                    Lifecycle(earlier["lifecycle"]),
                    replayed=True,
                )
            changed = False
            for _ in range(_MAX_ATTEMPTS):
                record = _lifecycle_record(enrollment)
                if not enrollment.enabled and "deactivatedAt" in record:
                    break
                if not enrollment.enabled and "activatedAt" not in record:
                    break  # never activated: nothing to deprovision
                body = enrollment.body()
                for key in _READ_ONLY:
                    body.pop(key, None)
                body["provisioningStatus"] = "disabled"
                record["deactivatedAt"] = self._clock().isoformat()
                registration = enrollment.registration_state
                if registration is not None and registration.assigned_hub:
                    record["registeredHub"] = registration.assigned_hub
                info = dict(body.get("optionalDeviceInformation") or {})
                info[LIFECYCLE_KEY] = record
                body["optionalDeviceInformation"] = info
                updated = await self._update(body, enrollment.etag or "*")
                if updated is not None:
                    enrollment, changed = updated, True
                    break
                enrollment = await self._reauthorise(device_id, cmd.activation_code)
            else:
                raise Conflict("ENROLLMENT_CONCURRENTLY_MODIFIED", "the enrollment kept changing; try again")
            hub_disabled = await self._disable_on_hub(enrollment, device_id)
            lifecycle = (
                Lifecycle.DEPROVISIONED
                if "activatedAt" in _lifecycle_record(enrollment)
                else Lifecycle.ENROLLED
            )
            result = DeactivateResult(device_id, changed or hub_disabled, hub_disabled, lifecycle)
            await self._audit_entry(
                "deactivate", device_id, str(cmd.caller), cmd.request_id, "ok", f"changed={result.changed}"
            )
            await self._remember(cmd.request_id, fingerprint, result)
            return result

    async def _disable_on_hub(self, enrollment: Enrollment, device_id: str) -> bool:
        registration = enrollment.registration_state
        hub = (registration.assigned_hub if registration else None) or _lifecycle_record(enrollment).get(
            "registeredHub"
        )
        if not hub:
            return False
        hub = str(hub)
        try:
            for _ in range(_MAX_ATTEMPTS):
                device = await self._hubs.get_device(hub, device_id)
                if device is None or device.status == "disabled":
                    return False
                try:
                    await self._hubs.set_device_status(hub, device, "disabled")
                except CloudEtagMismatch:
                    continue
                return True
        except CloudUnavailable as exc:
            raise _unavailable(exc, "HUB") from exc
        except CloudRejected as exc:
            raise FailedPrecondition("HUB_REFUSED", f"the IoT hub refused the update: {exc}") from exc
        raise Conflict("HUB_DEVICE_CONCURRENTLY_MODIFIED", "the hub device kept changing; try again")

    # ------------------------------------------------------------------------------------- status
    async def status(self, raw_id: str, code: str, caller: Caller | None = None) -> DeviceStatus:
        caller = caller or Caller.internal()
        device_id, enrollment = await self._authorised("status", raw_id, code, caller, "")
        record = _lifecycle_record(enrollment)
        registration = enrollment.registration_state
        device: HubDevice | None = None
        hub = (registration.assigned_hub if registration else None) or record.get("registeredHub") or ""
        if hub:
            try:
                device = await self._hubs.get_device(str(hub), device_id)
            except CloudUnavailable as exc:
                raise _unavailable(exc, "HUB") from exc
        activated = "activatedAt" in record
        if not enrollment.enabled:
            lifecycle = Lifecycle.DEPROVISIONED if activated else Lifecycle.ENROLLED
        elif device is not None and registration is not None and registration.assigned:
            lifecycle = Lifecycle.REGISTERED
        else:
            lifecycle = Lifecycle.ACTIVATED
        moments = [
            device.last_activity if device else None,
            registration.last_updated if registration else None,
            parse_azure_time(str(enrollment.raw.get("lastUpdatedDateTimeUtc") or "")),
        ]
        known = [m for m in moments if m is not None]
        return DeviceStatus(
            device_id=device_id,
            lifecycle=lifecycle,
            provisioning_status=enrollment.provisioning_status,
            allocated_hub=enrollment.iot_hubs[0] if enrollment.iot_hubs and activated else "",
            registered_hub=str(hub) if device else "",
            hub_device_status=device.status if device else "",
            hub_connection_state=device.connection_state if device else "",
            last_activity=max(known) if known else None,
            activated_at=_when(record, "activatedAt"),
            deactivated_at=_when(record, "deactivatedAt"),
        )
