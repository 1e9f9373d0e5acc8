"""The DPS domain without sockets, on a real SQLite file and the real hub registry, with an injected
clock: certificate validity edges, allocation and reprovisioning rules, secondary certificates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from support.certs import TestCa
from support.clock import ManualClock

from azure_iot_emulator.dps.errors import DpsError
from azure_iot_emulator.dps.service import DpsService, hashed_choice
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


def test_validity_window_uses_the_injected_clock(world, tmp_path):
    service, registry, clock = world
    start = clock.now
    cert = TestCa().issue(tmp_path, "dev-1", not_before=start, not_after=start + timedelta(days=1))
    _enroll(service, "dev-1", cert)
    clock.now = start - timedelta(seconds=1)
    with pytest.raises(DpsError) as early:
        service.register_x509("dev-1", cert.certificate, "op")
    assert (early.value.status, early.value.code) == (401, 401002)
    clock.now = start + timedelta(days=1, seconds=1)
    with pytest.raises(DpsError):
        service.register_x509("dev-1", cert.certificate, "op")
    assert not any(registry.device_exists(h, "dev-1") for h in HUBS)
    clock.now = start + timedelta(hours=1)
    assert service.register_x509("dev-1", cert.certificate, "op").body["status"] == "assigned"


def test_secondary_certificate_and_case_insensitive_registration_id(world, tmp_path):
    service, registry, _ = world
    ca = TestCa()
    primary, secondary = ca.issue(tmp_path / "p", "Dev-X"), ca.issue(tmp_path / "s", "Dev-X")
    _enroll(service, "Dev-X", primary, secondary)
    outcome = service.register_x509("dev-x", secondary.certificate, "op")
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


def test_static_allocation_and_reprovision_policies(world, tmp_path):
    service, registry, _ = world
    ca = TestCa()
    cert = ca.issue(tmp_path, "dev-s")
    created = _enroll(
        service, "dev-s", cert, allocationPolicy="static", iotHubs=["hub-b.local", "hub-c.local"]
    )
    assert service.register_x509("dev-s", cert.certificate, "op").body["registrationState"][
        "assignedHub"
    ] == ("hub-b.local")
    # Moved enrollment, but the policy says keep the current assignment.
    body = {
        **created,
        "iotHubs": ["hub-a.local"],
        "reprovisionPolicy": {"updateHubAssignment": False, "migrateDeviceData": False},
    }
    updated = service.put_enrollment("dev-s", body, created["etag"])
    state = service.register_x509("dev-s", cert.certificate, "op").body["registrationState"]
    assert state["assignedHub"] == "hub-b.local"
    # Now allow moving, without migrating data.
    body = {**updated, "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": False}}
    service.put_enrollment("dev-s", body, updated["etag"])
    state = service.register_x509("dev-s", cert.certificate, "op").body["registrationState"]
    assert (state["assignedHub"], state["substatus"]) == ("hub-a.local", "deviceDataReset")
    assert registry.device_exists("hub-a.local", "dev-s") and not registry.device_exists(
        "hub-b.local", "dev-s"
    )


def test_disabled_never_touches_the_hub_and_reenabling_is_an_initial_assignment(world, tmp_path):
    service, registry, _ = world
    cert = TestCa().issue(tmp_path, "dev-d")
    created = _enroll(service, "dev-d", cert, provisioningStatus="disabled", initialTwin={"tags": {"t": 1}})
    outcome = service.register_x509("dev-d", cert.certificate, "op")
    assert outcome.body["status"] == "disabled" and "assignedHub" not in outcome.body["registrationState"]
    assert not any(registry.device_exists(h, "dev-d") for h in HUBS)
    service.put_enrollment("dev-d", {**created, "provisioningStatus": "enabled"}, created["etag"])
    state = service.register_x509("dev-d", cert.certificate, "op").body["registrationState"]
    assert state["substatus"] == "initialAssignment"
    assert registry.get_twin(state["assignedHub"], "dev-d").tags == {"t": 1}
