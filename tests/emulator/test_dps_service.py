"""The DPS domain without sockets, on a real SQLite file and the real hub registry, with an injected
clock: certificate validity edges, allocation and reprovisioning rules, secondary certificates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from support.certs import TestCa
from support.clock import ManualClock

from azure_iot_emulator.dps.allocation import (
    AllocationFailed,
    builtin_hub,
    hashed_choice,
    parse_allocation_response,
)
from azure_iot_emulator.dps.errors import DpsError
from azure_iot_emulator.dps.service import DpsService
from azure_iot_emulator.hub.registry import HubRegistry
from azure_iot_emulator.store import Database

HUBS = ("hub-a.local", "hub-b.local", "hub-c.local")


@pytest.fixture
def world(tmp_path):
    db = Database(tmp_path / "emulator.db")
    clock = ManualClock(datetime.now(UTC))
    registry = HubRegistry(db, HUBS, clock)
    service = DpsService(db, id_scope="0ne00000001", hub_hosts=HUBS, registry=registry, clock=clock)
    yield service, registry, clock
    db.close()


def _enroll(service, reg_id, *certs, **extra):
    slots = dict(zip(("primary", "secondary"), ({"certificate": c.pem} for c in certs), strict=False))
    body = {"registrationId": reg_id, "attestation": {"type": "x509", "x509": {"clientCertificates": slots}}}
    return service.put_enrollment(reg_id, {**body, **extra}, None)


async def test_validity_window_uses_the_injected_clock(world, tmp_path):
    service, registry, clock = world
    start = clock.now
    cert = TestCa().issue(tmp_path, "dev-1", not_before=start, not_after=start + timedelta(days=1))
    _enroll(service, "dev-1", cert)
    clock.now = start - timedelta(seconds=1)
    with pytest.raises(DpsError) as early:
        await service.register_x509("dev-1", cert.certificate, "op")
    assert (early.value.status, early.value.code) == (401, 401002)
    clock.now = start + timedelta(days=1, seconds=1)
    with pytest.raises(DpsError):
        await service.register_x509("dev-1", cert.certificate, "op")
    assert not any(registry.device_exists(h, "dev-1") for h in HUBS)
    clock.now = start + timedelta(hours=1)
    assert (await service.register_x509("dev-1", cert.certificate, "op")).body["status"] == "assigned"


async def test_secondary_certificate_and_case_insensitive_registration_id(world, tmp_path):
    service, registry, _ = world
    ca = TestCa()
    primary, secondary = ca.issue(tmp_path / "p", "Dev-X"), ca.issue(tmp_path / "s", "Dev-X")
    _enroll(service, "Dev-X", primary, secondary)
    outcome = await service.register_x509("dev-x", secondary.certificate, "op")
    state = outcome.body["registrationState"]
    assert (
        state["deviceId"] == "Dev-X" and state["x509"]["certificateInfo"]["sha1Thumbprint"] == secondary.sha1
    )
    device = registry.get_device(state["assignedHub"], "Dev-X")
    assert device is not None and device.thumbprint_matches(secondary.sha1, secondary.sha256)


def test_hashed_allocation_is_deterministic_and_spreads():
    ids = [f"device-{n}" for n in range(300)]
    first = [hashed_choice(i, HUBS) for i in ids]
    assert first == [hashed_choice(i.upper(), HUBS) for i in ids]
    counts = {h: first.count(h) for h in HUBS}
    assert all(count > 50 for count in counts.values()), counts


async def test_static_allocation_and_reprovision_policies(world, tmp_path):
    service, registry, _ = world
    ca = TestCa()
    cert = ca.issue(tmp_path, "dev-s")
    created = _enroll(
        service, "dev-s", cert, allocationPolicy="static", iotHubs=["hub-b.local", "hub-c.local"]
    )
    assert (await service.register_x509("dev-s", cert.certificate, "op")).body["registrationState"][
        "assignedHub"
    ] == ("hub-b.local")
    # Moved enrollment, but the policy says keep the current assignment.
    body = {
        **created,
        "iotHubs": ["hub-a.local"],
        "reprovisionPolicy": {"updateHubAssignment": False, "migrateDeviceData": False},
    }
    updated = service.put_enrollment("dev-s", body, created["etag"])
    state = (await service.register_x509("dev-s", cert.certificate, "op")).body["registrationState"]
    assert state["assignedHub"] == "hub-b.local"
    # Now allow moving, without migrating data.
    body = {**updated, "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": False}}
    service.put_enrollment("dev-s", body, updated["etag"])
    state = (await service.register_x509("dev-s", cert.certificate, "op")).body["registrationState"]
    assert (state["assignedHub"], state["substatus"]) == ("hub-a.local", "deviceDataReset")
    assert registry.device_exists("hub-a.local", "dev-s") and not registry.device_exists(
        "hub-b.local", "dev-s"
    )


async def test_disabled_never_touches_the_hub_and_reenabling_is_an_initial_assignment(world, tmp_path):
    service, registry, _ = world
    cert = TestCa().issue(tmp_path, "dev-d")
    created = _enroll(service, "dev-d", cert, provisioningStatus="disabled", initialTwin={"tags": {"t": 1}})
    outcome = await service.register_x509("dev-d", cert.certificate, "op")
    assert outcome.body["status"] == "disabled" and "assignedHub" not in outcome.body["registrationState"]
    assert not any(registry.device_exists(h, "dev-d") for h in HUBS)
    service.put_enrollment("dev-d", {**created, "provisioningStatus": "enabled"}, created["etag"])
    state = (await service.register_x509("dev-d", cert.certificate, "op")).body["registrationState"]
    assert state["substatus"] == "initialAssignment"
    assert registry.get_twin(state["assignedHub"], "dev-d").tags == {"t": 1}


def test_lowest_latency_is_the_first_enrollment_hub_in_the_configured_order():
    assert builtin_hub("geoLatency", "d", ["hub-c.local", "hub-b.local"], HUBS) == "hub-b.local"
    assert builtin_hub("static", "d", ["hub-c.local", "hub-b.local"], HUBS) == "hub-c.local"
    assert builtin_hub(None, "d", list(HUBS), HUBS) == hashed_choice("d", HUBS)


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (200, b'{"iotHubHostName": "HUB-B.local", "payload": {"k": 1}}', None),
        (401, b"", 400209),
        (403, b"", 400207),
        (500, b'{"iotHubHostName": "hub-b.local"}', 400207),
        (302, b"", 400207),
        (200, b'{"iotHubHostName": ""}', 400208),
        (200, b"{}", 400208),
        (200, b'{"iotHubHostName": 7}', 400207),
        (200, b'{"iotHubHostName": "hub-x.local"}', 400207),
        (200, b'{"iotHubHostName": "hub-b.local", "payload": "text"}', 400207),
        (200, b'{"iotHubHostName": "hub-b.local", "initialTwin": {"tags": 3}}', 400207),
        (200, b"\xff\xfe", 400207),
        (200, b"[" * 100 + b"]" * 100, 400207),
    ],
)
def test_allocation_response_rules(status, body, code):
    hubs = ["hub-a.local", "hub-b.local"]
    if code is None:
        allocation = parse_allocation_response(status, body, hubs)
        assert allocation.hub == "hub-b.local" and allocation.payload == {"k": 1}
        assert allocation.initial_twin is None
        return
    with pytest.raises(AllocationFailed) as failed:
        parse_allocation_response(status, body, hubs)
    assert failed.value.code == code


async def test_custom_allocation_with_no_webhook_listening_fails_and_writes_nothing(world, tmp_path):
    service, registry, _ = world
    cert = TestCa().issue(tmp_path, "dev-c")
    definition = {"webhookUrl": "http://127.0.0.1:9/allocate", "apiVersion": "2021-10-01"}
    _enroll(service, "dev-c", cert, allocationPolicy="custom", customAllocationDefinition=definition)
    outcome = await service.register_x509("dev-c", cert.certificate, "op", {"p": 1})
    state = outcome.body["registrationState"]
    assert (outcome.body["status"], state["status"], state["errorCode"]) == ("failed", "failed", 400207)
    assert not any(registry.device_exists(h, "dev-c") for h in HUBS)
    with pytest.raises(DpsError):
        service.get_registration("dev-c")
    await service.webhook.close()
