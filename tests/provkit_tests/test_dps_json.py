"""The enrollment model's round trip through DPS JSON (provkit.dps_json)."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime

from provkit.cloud import (
    ActivationRecord,
    CloudAlreadyExists,
    CloudEtagMismatch,
    CloudRejected,
    Enrollment,
    HubAllocation,
    InitialTwin,
    ProvisioningStatus,
    X509Attestation,
)
from provkit.dps_json import bulk_errors_from_json, enrollment_from_json, enrollment_to_json

CODE = {"alg": "scrypt", "n": 256, "r": 8, "p": 1, "salt": "c2FsdA==", "hash": "aGFzaA=="}
ACTIVATED = datetime(2026, 5, 1, 10, 0, tzinfo=UTC)

AS_READ = {
    "registrationId": "dev-1",
    "deviceId": "dev-1",
    "etag": '"7"',
    "provisioningStatus": "disabled",
    "createdDateTimeUtc": "2026-05-01T09:00:00.1234567Z",
    "lastUpdatedDateTimeUtc": "2026-05-01T09:30:00Z",
    "registrationState": {
        "registrationId": "dev-1",
        "status": "assigned",
        "assignedHub": "hub-a.example",
        "deviceId": "dev-1",
        "lastUpdatedDateTimeUtc": "2026-05-01T09:31:00Z",
    },
    "attestation": {
        "type": "x509",
        "x509": {
            "clientCertificates": {
                "primary": {"certificate": "PEM-1", "info": {"sha256Thumbprint": "ab12"}},
                "secondary": {"certificate": "PEM-SPARE"},
            },
            "caReferences": {"primary": None},
        },
    },
    "initialTwin": {
        "tags": {"line": "A", "$metadata": {"x": 1}},
        "properties": {"desired": {"fw": "1.0", "$version": 3}},
    },
    "iotHubHostName": "hub-a.example",
    "capabilities": {"iotEdge": False},
    "reprovisionPolicy": {"updateHubAssignment": False, "migrateDeviceData": True},
    "customAllocationDefinition": {"webhookUrl": "https://alloc.example/", "apiVersion": "2021-10-01"},
    "optionalDeviceInformation": {
        "activationCode": CODE,
        "activation": {"activatedAt": ACTIVATED.isoformat(), "registeredHub": "hub-a.example"},
        "owner": {"oem": "oem-7"},
        "warranty": {"until": "2031-01-01", "plan": "gold"},
    },
    "futureField": [1, {"nested": True}],
}
NOT_MODELLED = ("capabilities", "reprovisionPolicy", "customAllocationDefinition", "futureField")


def test_reading_fills_every_modelled_field() -> None:
    enrollment = enrollment_from_json(AS_READ)
    assert enrollment.registration_id == enrollment.device_id == "dev-1"
    assert enrollment.etag == '"7"' and not enrollment.enabled
    assert enrollment.attestation == X509Attestation("PEM-1", "AB12", "PEM-SPARE")
    assert enrollment.code_hash == CODE and enrollment.owner == "oem-7"
    assert enrollment.activation == ActivationRecord(ACTIVATED, None, "hub-a.example")
    assert enrollment.initial_twin == InitialTwin({"line": "A"}, {"fw": "1.0"})
    assert enrollment.allocation == HubAllocation(("hub-a.example",), None)
    state = enrollment.registration_state
    assert state is not None and state.assigned and state.assigned_hub == "hub-a.example"
    assert enrollment.last_updated == datetime(2026, 5, 1, 9, 30, tzinfo=UTC)


def test_unchanged_enrollment_is_written_back_as_read_without_the_read_only_fields() -> None:
    body = enrollment_to_json(enrollment_from_json(copy.deepcopy(AS_READ)))
    expected = {
        k: v
        for k, v in AS_READ.items()
        if k not in ("etag", "createdDateTimeUtc", "lastUpdatedDateTimeUtc", "registrationState")
    }
    assert body == expected


def test_an_update_changes_only_what_the_domain_changed_and_keeps_unknown_fields() -> None:
    read = enrollment_from_json(copy.deepcopy(AS_READ))
    activated = replace(
        read,
        provisioning_status=ProvisioningStatus.ENABLED,
        initial_twin=InitialTwin({"line": "B"}, {}),
        allocation=HubAllocation(("hub-b.example",), "static"),
        activation=replace(read.activation, deactivated_at=ACTIVATED),
    )
    body = enrollment_to_json(activated)
    for key in NOT_MODELLED:
        assert body[key] == AS_READ[key]
    assert body["attestation"] == AS_READ["attestation"]  # not touched: secondary certificate kept
    assert body["optionalDeviceInformation"]["warranty"] == {"until": "2031-01-01", "plan": "gold"}
    assert body["optionalDeviceInformation"]["activationCode"] == CODE
    assert body["optionalDeviceInformation"]["owner"] == {"oem": "oem-7"}
    assert body["provisioningStatus"] == "enabled"
    assert body["initialTwin"] == {"tags": {"line": "B"}, "properties": {"desired": {}}}
    assert body["iotHubs"] == ["hub-b.example"] and body["allocationPolicy"] == "static"
    assert "iotHubHostName" not in body
    again = enrollment_from_json({**body, "etag": '"8"'})
    assert again.activation.deactivated_at == ACTIVATED and again.activation.activated_at == ACTIVATED
    assert replace(
        again, etag='"7"', registration_state=read.registration_state, last_updated=read.last_updated
    ) == (activated)


def test_a_new_certificate_replaces_the_whole_attestation() -> None:
    read = enrollment_from_json(copy.deepcopy(AS_READ))
    body = enrollment_to_json(replace(read, attestation=X509Attestation("PEM-2"), code_hash={"other": 1}))
    assert body["attestation"] == {
        "type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": "PEM-2"}}},
    }
    assert body["optionalDeviceInformation"]["activationCode"] == {"other": 1}
    assert body["futureField"] == AS_READ["futureField"]


def test_a_secondary_certificate_is_written_and_the_primary_slot_kept_as_read() -> None:
    read = enrollment_from_json(copy.deepcopy(AS_READ))
    renewing = replace(read, attestation=replace(read.attestation, secondary_pem="PEM-NEW"))
    body = enrollment_to_json(renewing)
    certificates = body["attestation"]["x509"]["clientCertificates"]
    assert certificates["primary"] == AS_READ["attestation"]["x509"]["clientCertificates"]["primary"]
    assert certificates["secondary"] == {"certificate": "PEM-NEW"}
    for key in (*NOT_MODELLED, "optionalDeviceInformation", "initialTwin", "provisioningStatus"):
        assert body[key] == enrollment_to_json(read)[key]
    assert enrollment_from_json(body).attestation.secondary_pem == "PEM-NEW"


def test_promotion_makes_the_secondary_the_primary_and_drops_the_slot() -> None:
    read = enrollment_from_json(copy.deepcopy(AS_READ))
    promoted = replace(read, attestation=X509Attestation("PEM-SPARE"))
    body = enrollment_to_json(promoted)
    assert body["attestation"]["x509"]["clientCertificates"] == {"primary": {"certificate": "PEM-SPARE"}}
    assert body["futureField"] == AS_READ["futureField"]


def test_a_new_enrollment_round_trips() -> None:
    new = Enrollment(
        "dev-2",
        X509Attestation("PEM-3"),
        ProvisioningStatus.DISABLED,
        device_id="dev-2",
        code_hash=CODE,
        owner="oem-1",
    )
    body = enrollment_to_json(new)
    assert body["capabilities"] == {"iotEdge": False} and "initialTwin" not in body
    slots = {"primary": {"certificate": "PEM-3"}}
    assert body["attestation"] == {"type": "x509", "x509": {"clientCertificates": slots}}
    assert enrollment_from_json(body) == new
    both = replace(new, attestation=X509Attestation("PEM-3", secondary_pem="PEM-4"))
    assert enrollment_from_json(enrollment_to_json(both)) == both  # a new one with both slots


def test_bulk_error_codes_become_the_domain_error_kinds() -> None:
    errors = bulk_errors_from_json(
        {
            "isSuccessful": False,
            "errors": [
                {"registrationId": "a", "errorCode": 409201, "errorStatus": "Conflict"},
                {"registrationId": "b", "errorCode": 400004, "errorStatus": "Bad certificate"},
                {"registrationId": "c", "errorCode": 412001, "errorStatus": "ETag mismatch"},
            ],
        }
    )
    assert [e.registration_id for e in errors] == ["a", "b", "c"]
    assert isinstance(errors[2].error, CloudEtagMismatch) and errors[2].error.status == 412
    assert isinstance(errors[0].error, CloudAlreadyExists) and errors[0].error.status == 409
    assert isinstance(errors[1].error, CloudRejected) and errors[1].error.status == 400
    assert bulk_errors_from_json({"isSuccessful": True, "errors": []}) == []
