"""DPS's JSON for individual enrollments, bulk results and registration states, to and from the typed
records of ``provkit.cloud``.  Part of the DPS adapter: only ``provkit.dps`` uses it (no SDK import here,
so it is tested on its own), and the enrollment outbox reads with it the entries of files written before
its entries had their own shape (they held the DPS body).

Where the model lives in the body:

- ``registrationId``, ``deviceId``, ``provisioningStatus``, ``etag`` (read-only), ``registrationState``
  (read-only), ``lastUpdatedDateTimeUtc`` (read-only);
- ``attestation.x509.clientCertificates.primary`` and ``.secondary`` (``certificate``;
  ``info.sha256Thumbprint`` read-only); a slot the domain did not change is written back as DPS sent it;
- ``initialTwin`` (``tags``, ``properties.desired``; ``$metadata`` / ``$version`` are the service's);
- ``iotHubs``, ``allocationPolicy`` (and the older single ``iotHubHostName``, dropped when the domain
  sets the hubs);
- ``optionalDeviceInformation``: ``activationCode`` (the code hash record), ``activation``
  (``activatedAt``, ``deactivatedAt``, ``registeredHub``) and ``owner`` (``{"oem": id}``).

Writing back (``enrollment_to_json``): the body starts from the enrollment as it was read
(``Enrollment.unmodelled``), without the read-only fields; each modelled section the domain changed is
written from the model, each one it left alone stays exactly as DPS sent it, and everything the suite does
not model (capabilities, reprovision policy, custom allocation, other device
information) goes back untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from provkit.activation_code import CODE_RECORD_KEY
from provkit.cloud import (
    ActivationRecord,
    BulkItemError,
    CloudAlreadyExists,
    CloudError,
    CloudEtagMismatch,
    CloudRejected,
    Enrollment,
    EnrollmentGroup,
    HubAllocation,
    InitialTwin,
    ProvisioningStatus,
    RegistrationState,
    Unmodelled,
    X509Attestation,
    parse_azure_time,
)

ACTIVATION_KEY = "activation"
OWNER_KEY = "owner"
READ_ONLY = ("etag", "registrationState", "createdDateTimeUtc", "lastUpdatedDateTimeUtc")
_NEW_CAPABILITIES = {"iotEdge": False}
_NO_ACTIVATION = ActivationRecord()
_NO_ATTESTATION = X509Attestation()


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _strip_meta(section: Any) -> dict[str, Any]:
    return {k: v for k, v in _object(section).items() if not k.startswith("$")}


def _copy(value: Any) -> Any:
    """A deep copy of a JSON document (dicts and lists copied, their leaves shared: strings, numbers,
    booleans and None never change); ``copy.deepcopy``'s memo and dispatch made it a tenth of a DPS call."""
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    return parse_azure_time(value) if isinstance(value, str) else None


# ------------------------------------------------------------------------------------------------- read
def registration_state_from_json(state: Mapping[str, Any]) -> RegistrationState:
    return RegistrationState(
        registration_id=str(state.get("registrationId") or ""),
        status=str(state.get("status") or "unassigned"),
        assigned_hub=state.get("assignedHub") or None,
        device_id=state.get("deviceId") or None,
        last_updated=_time(state.get("lastUpdatedDateTimeUtc")),
    )


def _slot(value: Any, slot: str) -> tuple[str | None, str | None]:
    """(PEM, SHA-256 thumbprint) of one client certificate slot (``primary`` / ``secondary``)."""
    entry = _object(_object(_object(_object(value).get("x509")).get("clientCertificates")).get(slot))
    thumbprint = _object(entry.get("info")).get("sha256Thumbprint")
    return entry.get("certificate") or None, str(thumbprint).upper() if thumbprint else None


def _attestation(value: Any) -> X509Attestation:
    primary, primary_sha256 = _slot(value, "primary")
    secondary, secondary_sha256 = _slot(value, "secondary")
    return X509Attestation(primary, primary_sha256, secondary, secondary_sha256)


def _initial_twin(value: Any) -> InitialTwin | None:
    if not isinstance(value, Mapping):
        return None
    return InitialTwin(
        _strip_meta(value.get("tags")), _strip_meta(_object(value.get("properties")).get("desired"))
    )


def _allocation(body: Mapping[str, Any]) -> HubAllocation:
    hubs = body.get("iotHubs")
    if not hubs and body.get("iotHubHostName"):
        hubs = [body["iotHubHostName"]]
    policy = body.get("allocationPolicy")
    return HubAllocation(tuple(str(h) for h in hubs or ()), str(policy) if policy else None)


def _activation(value: Any) -> ActivationRecord:
    record = _object(value)
    hub = record.get("registeredHub")
    return ActivationRecord(
        activated_at=_time(record.get("activatedAt")),
        deactivated_at=_time(record.get("deactivatedAt")),
        registered_hub=str(hub) if hub else None,
    )


def enrollment_from_json(body: Mapping[str, Any], registration_id: str = "") -> Enrollment:
    info = _object(body.get("optionalDeviceInformation"))
    code_hash = info.get(CODE_RECORD_KEY)
    owner = _object(info.get(OWNER_KEY)).get("oem")
    state = body.get("registrationState")
    status = body.get("provisioningStatus") or "enabled"
    etag = body.get("etag")
    return Enrollment(
        registration_id=str(body.get("registrationId") or registration_id),
        attestation=_attestation(body.get("attestation")),
        provisioning_status=(
            ProvisioningStatus.DISABLED if status == "disabled" else ProvisioningStatus.ENABLED
        ),
        device_id=body.get("deviceId") or None,
        code_hash=code_hash if isinstance(code_hash, Mapping) else None,
        owner=str(owner) if owner else None,
        activation=_activation(info.get(ACTIVATION_KEY)),
        initial_twin=_initial_twin(body.get("initialTwin")),
        allocation=_allocation(body),
        etag=str(etag) if etag else None,
        registration_state=registration_state_from_json(state)
        if isinstance(state, Mapping) and state
        else None,
        last_updated=_time(body.get("lastUpdatedDateTimeUtc")),
        unmodelled=Unmodelled(body),
    )


def bulk_errors_from_json(result: Mapping[str, Any] | None) -> list[BulkItemError]:
    """The per-record failures of a bulk operation.  DPS's error codes carry the HTTP status in their
    first three digits (409xxx: the registration id is taken)."""
    errors: list[BulkItemError] = []
    for item in _object(result).get("errors") or ():
        code = int(item.get("errorCode") or 0)
        message = f"{item.get('errorStatus') or 'refused'} ({code})"
        status = code // 1000 if code >= 100_000 else code
        error: CloudError
        if status == 409:
            error = CloudAlreadyExists(message, status=status)
        elif status == 412:  # updateIfMatchETag: changed (or gone) since it was read
            error = CloudEtagMismatch(message, status=status)
        else:
            error = CloudRejected(message, status=status or None)
        errors.append(BulkItemError(str(item.get("registrationId") or ""), error))
    return errors


# ------------------------------------------------------------------------------------------------ write
def _attestation_json(attestation: X509Attestation, sent: Any = None) -> dict[str, Any]:
    """The attestation to write: each slot the domain changed from the model, the others as DPS ``sent``
    them (real DPS may answer a slot's ``info`` without its certificate: it goes back as it came)."""
    kept: Mapping[str, Any] = {}
    before = _NO_ATTESTATION
    if sent is not None:  # an update; a new enrollment (each item of a bulk create) has nothing to keep
        before = _attestation(sent)
        kept = _object(_object(_object(sent).get("x509")).get("clientCertificates"))
    certificates: dict[str, Any] = {}
    for slot, pem, old in (
        ("primary", attestation.certificate_pem, before.certificate_pem),
        ("secondary", attestation.secondary_pem, before.secondary_pem),
    ):
        if pem != old or slot not in kept:
            if pem is not None or slot == "primary":
                certificates[slot] = {"certificate": pem}
        elif kept.get(slot) is not None:
            certificates[slot] = _copy(kept[slot])
    return {"type": "x509", "x509": {"clientCertificates": certificates}}


def _moment(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _activation_json(record: ActivationRecord) -> dict[str, Any]:
    out = {
        "activatedAt": _moment(record.activated_at),
        "deactivatedAt": _moment(record.deactivated_at),
        "registeredHub": record.registered_hub,
    }
    return {k: v for k, v in out.items() if v is not None}


def _set(target: dict[str, Any], key: str, value: Any) -> None:
    if value is None or value == {}:
        target.pop(key, None)
    else:
        target[key] = value


def enrollment_to_json(enrollment: Enrollment) -> dict[str, Any]:
    """The body to send for a create or an update (no read-only fields)."""
    source = enrollment.unmodelled.document
    if not source:
        return _new_json(enrollment)
    before = enrollment_from_json(source)
    body: dict[str, Any] = _copy(dict(source))
    for key in READ_ONLY:
        body.pop(key, None)
    body["registrationId"] = enrollment.registration_id
    _set(body, "deviceId", enrollment.device_id)
    body["provisioningStatus"] = enrollment.provisioning_status.value
    if enrollment.attestation != before.attestation:
        body["attestation"] = _attestation_json(enrollment.attestation, source.get("attestation"))
    if enrollment.initial_twin != before.initial_twin:
        twin = enrollment.initial_twin
        _set(body, "initialTwin", None if twin is None else _twin_json(twin))
    if enrollment.allocation != before.allocation:
        body.pop("iotHubHostName", None)
        _set(body, "iotHubs", list(enrollment.allocation.iot_hubs) or None)
        _set(body, "allocationPolicy", enrollment.allocation.policy)
    info = dict(_object(body.get("optionalDeviceInformation")))
    if enrollment.code_hash != before.code_hash:
        _set(info, CODE_RECORD_KEY, None if enrollment.code_hash is None else dict(enrollment.code_hash))
    if enrollment.activation != before.activation:
        _set(info, ACTIVATION_KEY, _activation_json(enrollment.activation))
    if enrollment.owner != before.owner:
        _set(info, OWNER_KEY, {"oem": enrollment.owner} if enrollment.owner else None)
    _set(body, "optionalDeviceInformation", info)
    return body


def _twin_json(twin: InitialTwin) -> dict[str, Any]:
    return {"tags": dict(twin.tags), "properties": {"desired": dict(twin.desired)}}


def _new_json(enrollment: Enrollment) -> dict[str, Any]:
    body: dict[str, Any] = {
        "registrationId": enrollment.registration_id,
        "provisioningStatus": enrollment.provisioning_status.value,
        "attestation": _attestation_json(enrollment.attestation),
        "capabilities": dict(_NEW_CAPABILITIES),
    }
    if enrollment.device_id:
        body["deviceId"] = enrollment.device_id
    if enrollment.initial_twin is not None:
        body["initialTwin"] = _twin_json(enrollment.initial_twin)
    if enrollment.allocation.iot_hubs:
        body["iotHubs"] = list(enrollment.allocation.iot_hubs)
    if enrollment.allocation.policy:
        body["allocationPolicy"] = enrollment.allocation.policy
    info: dict[str, Any] = {}
    if enrollment.code_hash is not None:
        info[CODE_RECORD_KEY] = dict(enrollment.code_hash)
    if enrollment.activation != _NO_ACTIVATION:
        info[ACTIVATION_KEY] = _activation_json(enrollment.activation)
    if enrollment.owner:
        info[OWNER_KEY] = {"oem": enrollment.owner}
    if info:
        body["optionalDeviceInformation"] = info
    return body


# ------------------------------------------------------------------------------------ enrollment groups
def enrollment_group_from_json(body: Mapping[str, Any]) -> EnrollmentGroup:
    signing = _object(_object(_object(body.get("attestation")).get("x509")).get("signingCertificates"))
    primary = _object(signing.get("primary"))
    custom = _object(body.get("customAllocationDefinition"))
    hubs = body.get("iotHubs")
    return EnrollmentGroup(
        group_id=str(body.get("enrollmentGroupId") or ""),
        signing_certificate_pem=primary.get("certificate") or None,
        webhook_url=str(custom.get("webhookUrl") or ""),
        iot_hubs=tuple(str(h) for h in hubs) if isinstance(hubs, list) else (),
        enabled=body.get("provisioningStatus", "enabled") == "enabled",
        api_version=str(custom.get("apiVersion") or ""),
        etag=body.get("etag") or None,
        signing_sha256=(_object(primary.get("info")).get("sha256Thumbprint") or None),
        unmodelled=Unmodelled(_copy(dict(body))),
    )


def enrollment_group_to_json(group: EnrollmentGroup) -> dict[str, Any]:
    """The group as DPS takes it: what the suite models written from the record, the rest (capabilities,
    reprovision policy, device information) as it was read."""
    body = {k: v for k, v in _copy(dict(group.unmodelled.document)).items() if k not in READ_ONLY}
    body["enrollmentGroupId"] = group.group_id
    body["attestation"] = {
        "type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": group.signing_certificate_pem}}},
    }
    body["provisioningStatus"] = "enabled" if group.enabled else "disabled"
    body["allocationPolicy"] = "custom"
    body["customAllocationDefinition"] = {"webhookUrl": group.webhook_url, "apiVersion": group.api_version}
    body["iotHubs"] = list(group.iot_hubs)
    body.pop("iotHubHostName", None)
    body.setdefault("reprovisionPolicy", {"updateHubAssignment": True, "migrateDeviceData": True})
    body.setdefault("capabilities", dict(_NEW_CAPABILITIES))
    return body
