"""Individual enrollments: validation and normalisation of what the service API receives (pure)."""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from azure_iot_emulator import ids
from azure_iot_emulator.dps.certinfo import CertificateError, certificate_info, parse_certificate
from azure_iot_emulator.dps.errors import DpsError, bad_request
from azure_iot_emulator.hub import twin as twinmodel

ALLOCATION_POLICIES = ("hashed", "static", "geoLatency", "custom")
READ_ONLY = ("etag", "createdDateTimeUtc", "lastUpdatedDateTimeUtc", "registrationState")


# What a device's registration answer carries beside Azure's DeviceRegistrationState (how it attested: the
# certificate info and group, the symmetric key's group, the TPM key).  The service API's registration
# states (GET /registrations/{id}, a group's query, an individual enrollment's registrationState) are
# DeviceRegistrationState alone, so the emulator stores the device's view and shows the service this much.
DEVICE_ONLY_STATE = ("x509", "symmetricKey", "tpm")


def service_registration_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A stored registration state as the service API shows it (Azure's DeviceRegistrationState)."""
    return {key: value for key, value in state.items() if key not in DEVICE_ONLY_STATE}


def registration_key(registration_id: str) -> str:
    """Registration ids are case-insensitive."""
    return registration_id.lower()


def check_registration_id(value: Any) -> str:
    if not ids.is_registration_id(value):
        raise bad_request(f"invalid registration id {value!r}: {ids.REGISTRATION_ID_RULE}")
    return value


def json_object(value: object) -> dict[str, Any]:
    """A JSON object, from a document's text or an already parsed value (a stored body, one of its parts)."""
    parsed = json.loads(value) if isinstance(value, str | bytes) else value
    if not isinstance(parsed, dict):
        raise TypeError(f"expected a JSON object, got {type(parsed).__name__}")
    return parsed


def strip_etag(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def _dict(value: Any, what: str, *, optional: bool = True) -> dict[str, Any] | None:
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise bad_request(f"{what} must be a JSON object")
    return value


def _b64key(value: Any, what: str) -> str:
    if value is None:
        return base64.b64encode(secrets.token_bytes(32)).decode("ascii")
    if not isinstance(value, str):
        raise bad_request(f"{what} must be a base64 string")
    try:
        if len(base64.b64decode(value, validate=True)) < 16:
            raise bad_request(f"{what} is too short")
    except binascii.Error as exc:
        raise bad_request(f"{what} is not base64") from exc
    return value


def _certificate_entry(value: Any, what: str, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    entry = _dict(value, what, optional=False)
    assert entry is not None
    text = entry.get("certificate")
    if text is None:
        # A GET result sent back: only `info` -> keep the stored certificate when it is the same one.
        info = entry.get("info")
        if (
            previous
            and isinstance(info, dict)
            and info.get("sha256Thumbprint") == previous.get("info", {}).get("sha256Thumbprint")
        ):
            return dict(previous)
        raise bad_request(f"{what}.certificate is required")
    try:
        cert = parse_certificate(text)
    except CertificateError as exc:
        raise DpsError(400, 400012, f"{what}.certificate: {exc}") from exc
    return {"certificate": text, "info": certificate_info(cert)}


def _attestation(value: Any, previous: Mapping[str, Any] | None, *, group: bool = False) -> dict[str, Any]:
    """An individual enrollment's X.509 attestation names client certificates, a group's signing
    certificates (CA references need DPS's certificate store, which is not emulated); TPM is individual."""
    att = _dict(value, "attestation", optional=False)
    assert att is not None
    kind = att.get("type")
    prev = previous if previous and previous.get("type") == kind else None
    if kind == "x509":
        x509 = _dict(att.get("x509"), "attestation.x509", optional=False)
        assert x509 is not None
        slot, other = ("clientCertificates", "signingCertificates")
        if group:
            slot, other = other, slot
        if x509.get("caReferences"):
            raise bad_request("attestation.x509.caReferences: DPS CA certificates are not emulated, "
                              "give the CA as attestation.x509.signingCertificates")
        if x509.get(other):
            raise bad_request(f"{'enrollment groups' if group else 'individual enrollments'} support "
                              f"attestation.x509.{slot} only")
        given = _dict(x509.get(slot), f"attestation.x509.{slot}", optional=False)
        assert given is not None
        if given.get("primary") is None:
            raise bad_request(f"attestation.x509.{slot}.primary is required")
        old = ((prev or {}).get("x509") or {}).get(slot) or {}
        certs = {"primary": _certificate_entry(given["primary"], "primary", old.get("primary"))}
        if given.get("secondary") is not None:
            certs["secondary"] = _certificate_entry(given["secondary"], "secondary", old.get("secondary"))
        return {"type": "x509", "x509": {slot: certs}}
    if kind == "symmetricKey":
        keys = _dict(att.get("symmetricKey"), "attestation.symmetricKey") or {}
        return {
            "type": "symmetricKey",
            "symmetricKey": {
                "primaryKey": _b64key(keys.get("primaryKey"), "primaryKey"),
                "secondaryKey": _b64key(keys.get("secondaryKey"), "secondaryKey"),
            },
        }
    if kind == "tpm" and not group:
        tpm = _dict(att.get("tpm"), "attestation.tpm", optional=False)
        assert tpm is not None
        if not isinstance(tpm.get("endorsementKey"), str):
            raise bad_request("attestation.tpm.endorsementKey is required")
        return {"type": "tpm", "tpm": {k: tpm[k] for k in ("endorsementKey", "storageRootKey") if k in tpm}}
    kinds = "x509 or symmetricKey" if group else "x509, symmetricKey or tpm"
    raise bad_request(f"attestation.type must be {kinds}")


def _hub(value: Any, linked: Sequence[str], what: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{what} must be a string")
    for hub in linked:
        if hub.lower() == value.lower():
            return hub
    raise bad_request(f"{what} {value!r} is not a linked IoT hub ({', '.join(linked)})", 400011)


def initial_twin(value: Any) -> dict[str, Any] | None:
    twin = _dict(value, "initialTwin")
    if twin is None:
        return None
    out: dict[str, Any] = {}
    tags = _dict(twin.get("tags"), "initialTwin.tags")
    if tags is not None:
        out["tags"] = tags
    props = _dict(twin.get("properties"), "initialTwin.properties")
    if props is not None:
        desired = _dict(props.get("desired"), "initialTwin.properties.desired")
        out["properties"] = {"desired": desired if desired is not None else {}}
    return out


def normalise_enrollment(
    body: Any,
    *,
    path_id: str | None,
    linked_hubs: Sequence[str],
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate an IndividualEnrollment body completely and return the stored form (read-only fields
    dropped, defaults filled, certificates parsed and their ``info`` computed)."""
    if not isinstance(body, dict):
        raise bad_request("enrollment must be a JSON object")
    reg_id = check_registration_id(body.get("registrationId", path_id))
    if path_id is not None and registration_key(reg_id) != registration_key(path_id):
        raise bad_request("registrationId in the body differs from the one in the path")
    out: dict[str, Any] = {"registrationId": reg_id}
    if body.get("deviceId") is not None:
        if not ids.is_device_id(body["deviceId"]):
            raise bad_request(f"invalid deviceId {body['deviceId']!r}: {ids.DEVICE_ID_RULE}")
        out["deviceId"] = body["deviceId"]
    out["attestation"] = _attestation(body.get("attestation"), (previous or {}).get("attestation"))
    return _common_fields(body, out, linked_hubs)


def normalise_group(
    body: Any,
    *,
    path_id: str | None,
    linked_hubs: Sequence[str],
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An EnrollmentGroup body, checked and normalised as :func:`normalise_enrollment` does."""
    if not isinstance(body, dict):
        raise bad_request("enrollment group must be a JSON object")
    group_id = body.get("enrollmentGroupId", path_id)
    if not ids.is_registration_id(group_id):
        raise bad_request(f"invalid enrollment group id {group_id!r}: {ids.REGISTRATION_ID_RULE}")
    if path_id is not None and registration_key(group_id) != registration_key(path_id):
        raise bad_request("enrollmentGroupId in the body differs from the one in the path")
    out: dict[str, Any] = {"enrollmentGroupId": group_id}
    previous_attestation = (previous or {}).get("attestation")
    out["attestation"] = _attestation(body.get("attestation"), previous_attestation, group=True)
    return _common_fields(body, out, linked_hubs)


def _common_fields(body: dict[str, Any], out: dict[str, Any], linked_hubs: Sequence[str]) -> dict[str, Any]:
    """The fields individual enrollments and enrollment groups share, added to ``out``."""
    caps = _dict(body.get("capabilities"), "capabilities") or {}
    if not isinstance(caps.get("iotEdge", False), bool):
        raise bad_request("capabilities.iotEdge must be a boolean")
    out["capabilities"] = {"iotEdge": caps.get("iotEdge", False)}
    if body.get("iotHubHostName") is not None:
        out["iotHubHostName"] = _hub(body["iotHubHostName"], linked_hubs, "iotHubHostName")
    if body.get("iotHubs") is not None:
        if not isinstance(body["iotHubs"], list):
            raise bad_request("iotHubs must be a list of host names")
        out["iotHubs"] = [_hub(h, linked_hubs, "iotHubs entry") for h in body["iotHubs"]]
    policy = body.get("allocationPolicy")
    if policy is not None:
        if policy not in ALLOCATION_POLICIES:
            raise bad_request(f"allocationPolicy must be one of {', '.join(ALLOCATION_POLICIES)}")
        out["allocationPolicy"] = policy
    status = body.get("provisioningStatus", "enabled")
    if status not in ("enabled", "disabled"):
        raise bad_request("provisioningStatus must be enabled or disabled")
    out["provisioningStatus"] = status
    twin = initial_twin(body.get("initialTwin"))
    if twin is not None:
        out["initialTwin"] = twin
    rp = _dict(body.get("reprovisionPolicy"), "reprovisionPolicy") or {}
    for key in ("updateHubAssignment", "migrateDeviceData"):
        if not isinstance(rp.get(key, True), bool):
            raise bad_request(f"reprovisionPolicy.{key} must be a boolean")
    out["reprovisionPolicy"] = {
        "updateHubAssignment": rp.get("updateHubAssignment", True),
        "migrateDeviceData": rp.get("migrateDeviceData", True),
    }
    info = _dict(body.get("optionalDeviceInformation"), "optionalDeviceInformation")
    if info is not None:
        out["optionalDeviceInformation"] = info
    custom = _dict(body.get("customAllocationDefinition"), "customAllocationDefinition")
    if custom is not None or policy == "custom":
        out["customAllocationDefinition"] = custom_allocation_definition(custom)
    return out


_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")


def custom_allocation_definition(value: Mapping[str, Any] | None) -> dict[str, str]:
    """``{"webhookUrl": absolute http(s) URL, "apiVersion": "YYYY-MM-DD[-preview]"}``, both required (the
    webhook URL may carry an Azure Function's key in its query)."""
    if value is None:
        raise bad_request("allocationPolicy custom needs customAllocationDefinition (webhookUrl, apiVersion)")
    url = value.get("webhookUrl")
    if not isinstance(url, str) or not url:
        raise bad_request("customAllocationDefinition.webhookUrl is required")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise bad_request(f"customAllocationDefinition.webhookUrl is not a URL: {exc}") from exc
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise bad_request("customAllocationDefinition.webhookUrl must be an absolute http or https URL")
    if parts.username is not None or parts.password is not None:
        raise bad_request("customAllocationDefinition.webhookUrl must not carry user credentials")
    version = value.get("apiVersion")
    if not isinstance(version, str) or not _API_VERSION.fullmatch(version):
        raise bad_request("customAllocationDefinition.apiVersion is required (for example 2021-10-01)")
    return {"webhookUrl": url, "apiVersion": version}


def check_initial_twin(twin: Mapping[str, Any] | None) -> None:
    """The hub's twin rules (key names, depth, value types, sizes) applied when the enrollment (or a
    custom allocation's answer) is taken, so a registration never fails on them later."""
    try:
        tags, desired = twinmodel.initial_twin_parts(twin)
        twinmodel.validate_patch(tags, what="tags")
        twinmodel.validate_patch(desired, what="desired")
        for what, section in (("tags", tags), ("desired", desired)):
            if len(json.dumps(section, separators=(",", ":")).encode()) > twinmodel._limit_for(what):
                raise twinmodel.TwinError("TWIN_TOO_LARGE", f"initialTwin {what} too large")
    except twinmodel.TwinError as exc:
        raise bad_request(f"initialTwin: {exc}") from exc


def candidate_hubs(enrollment: Mapping[str, Any], linked: Sequence[str]) -> list[str]:
    if enrollment.get("iotHubs"):
        return list(enrollment["iotHubs"])
    if enrollment.get("iotHubHostName"):
        return [enrollment["iotHubHostName"]]
    return list(linked)
