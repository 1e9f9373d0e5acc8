"""HubRegistry on a real SQLite file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from support.clock import ManualClock

from azure_iot_emulator.hub import twin as twinmodel
from azure_iot_emulator.hub.registry import DeviceSpec, HubRegistry, RegistryError, device_spec_from_json
from azure_iot_emulator.store import Database

HUBS = ("127.0.0.2", "127.0.0.3")
SHA1 = "60BE9F" + "0" * 34
SHA256 = "AB" * 32


START = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "emulator.db")
    yield database
    database.close()


@pytest.fixture
def registry(db):
    return HubRegistry(db, HUBS, ManualClock(START))


def provision(registry, hub="127.0.0.2", device_id="dev-001", initial_twin=None, apply=True):
    registry.provision_from_dps(
        hub=hub,
        device_id=device_id,
        thumbprint_sha1=SHA1.lower(),
        thumbprint_sha256=SHA256,
        initial_twin=initial_twin,
        apply_initial_twin=apply,
    )


def test_provision_creates_selfsigned_enabled_device_with_initial_twin(registry):
    provision(registry, initial_twin={"tags": {"line": "A"}, "properties": {"desired": {"fw": "1.0"}}})
    assert registry.device_exists("127.0.0.2", "dev-001")
    assert not registry.device_exists("127.0.0.3", "dev-001")
    device = registry.get_device("127.0.0.2", "dev-001")
    assert device.auth_type == "selfSigned" and device.status == "enabled"
    assert device.primary_thumbprint == SHA1  # upper-case
    assert device.thumbprint_matches(SHA1.lower(), "00" * 32)
    assert not device.thumbprint_matches("11" * 20, "22" * 32)
    twin = registry.get_twin("127.0.0.2", "dev-001")
    assert twin.tags == {"line": "A"}
    assert twin.desired.props == {"fw": "1.0"}
    assert twin.desired.version == 2
    doc = registry.twin_json(device, twin)
    assert doc["properties"]["desired"]["$version"] == 2
    assert doc["properties"]["desired"]["$metadata"]["fw"]["$lastUpdatedVersion"] == 2
    assert doc["properties"]["desired"]["$metadata"]["$lastUpdated"].endswith("Z")
    assert doc["properties"]["reported"]["$version"] == 1


def test_reassignment_moves_the_device_and_its_twin(registry, db):
    provision(registry, initial_twin={"tags": {"a": 1}})
    provision(registry, hub="127.0.0.3", initial_twin={"tags": {"b": 2}})
    assert not registry.device_exists("127.0.0.2", "dev-001")
    assert registry.device_exists("127.0.0.3", "dev-001")
    assert registry.get_twin("127.0.0.2", "dev-001") is None
    assert registry.get_twin("127.0.0.3", "dev-001").tags == {"b": 2}


def test_reprovision_without_initial_twin_keeps_the_twin_and_changes_etag(registry):
    provision(registry, initial_twin={"tags": {"a": 1}})
    before = registry.get_device("127.0.0.2", "dev-001")
    provision(registry, initial_twin={"tags": {"z": 9}}, apply=False)
    after = registry.get_device("127.0.0.2", "dev-001")
    assert after.etag != before.etag and after.generation_id == before.generation_id
    assert registry.get_twin("127.0.0.2", "dev-001").tags == {"a": 1}


def test_provision_joins_caller_transaction_and_rolls_back(registry, db):
    with pytest.raises(RuntimeError), db.transaction():
        provision(registry)
        raise RuntimeError("DPS failed after creating the identity")
    assert not registry.device_exists("127.0.0.2", "dev-001")


def test_invalid_initial_twin_writes_nothing(registry):
    with pytest.raises(twinmodel.TwinError):
        provision(registry, initial_twin={"tags": {"bad.key": 1}})
    assert not registry.device_exists("127.0.0.2", "dev-001")


def test_unknown_hub_refused(registry):
    with pytest.raises(RegistryError) as info:
        provision(registry, hub="127.9.9.9")
    assert info.value.reason == "UNKNOWN_HUB"


def test_registry_persists_across_reopen(tmp_path):
    path = tmp_path / "emulator.db"
    first = Database(path)
    twin = {"properties": {"desired": {"x": 1}}}
    provision(HubRegistry(first, HUBS, ManualClock(START)), initial_twin=twin)
    first.close()
    second = Database(path)
    try:
        registry = HubRegistry(second, HUBS, ManualClock(START))
        assert registry.get_twin("127.0.0.2", "dev-001").desired.props == {"x": 1}
    finally:
        second.close()


def test_create_update_delete_and_connection_state(registry):
    clock = registry._clock
    spec = DeviceSpec(device_id="d2", auth_type="selfSigned", primary_thumbprint=SHA256.lower())
    device = registry.create_device("127.0.0.2", spec)
    with pytest.raises(RegistryError) as info:
        registry.create_device("127.0.0.2", spec)
    assert info.value.reason == "DEVICE_ALREADY_EXISTS"
    assert device.connection_state == "Disconnected"
    clock.now += timedelta(seconds=5)
    registry.set_connection_state("127.0.0.2", "d2", True)
    assert registry.get_device("127.0.0.2", "d2").connection_state == "Connected"
    registry.reset_connection_states()
    assert registry.get_device("127.0.0.2", "d2").connection_state == "Disconnected"
    updated = registry.update_device(
        "127.0.0.2", DeviceSpec(device_id="d2", status="disabled", primary_thumbprint=SHA1)
    )
    assert updated.status == "disabled" and updated.etag != device.etag
    assert registry.delete_device("127.0.0.2", "d2")
    assert not registry.delete_device("127.0.0.2", "d2")
    assert registry.get_twin("127.0.0.2", "d2") is None


def test_device_spec_from_json_validates():
    spec = device_spec_from_json(
        "d",
        {
            "deviceId": "d",
            "status": "enabled",
            "authentication": {
                "type": "selfSigned",
                "x509Thumbprint": {"primaryThumbprint": SHA1, "secondaryThumbprint": SHA1},
            },
        },
    )
    assert spec.primary_thumbprint == SHA1
    for bad in (
        {"deviceId": "other"},
        {"status": "paused"},
        {"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "XYZ"}}},
        {"authentication": {"type": "selfSigned"}},
        {"authentication": {"type": "magic"}},
    ):
        with pytest.raises(RegistryError):
            device_spec_from_json("d", bad)
    sas = device_spec_from_json("d", {"authentication": {"type": "sas"}})
    assert sas.primary_key and sas.secondary_key


def test_listeners_hear_when_dps_moves_a_device_or_changes_its_certificate(registry):
    heard = []
    registry.credential_listeners.append(lambda hub, device_id: heard.append((hub, device_id)))
    provision(registry)
    assert heard == []
    provision(registry, apply=False)  # same certificate again: nothing to drop
    assert heard == []
    provision(registry, hub="127.0.0.3")
    assert heard == [("127.0.0.2", "dev-001")]
    registry.provision_from_dps(
        hub="127.0.0.3",
        device_id="dev-001",
        thumbprint_sha1="CD" * 20,
        thumbprint_sha256="EF" * 32,
        initial_twin=None,
        apply_initial_twin=False,
    )
    assert heard[-1] == ("127.0.0.3", "dev-001")
