"""Message routes against a real emulator process with Microsoft's clients unchanged: azure-iot-hub's
registry manager creates, updates and deletes, azure-iot-device connects, reports and sends,
azure-iot-device's ProvisioningDeviceClient registers, and azure-eventhub reads what each hub's routes
send to its built-in endpoint (the events' properties and bodies as Azure documents them).

Three hubs: ``plain`` without routes (Azure's default: device messages only), ``routed`` with routes for
twin changes, lifecycle and connection state and one for alert messages (its fallback route on), and
``twins`` with a twin-change route and the alert route only, its fallback route off.  A device's events all
land in one partition in the order they were committed, so "nothing else was emitted" is read, not waited
for: the events before a last, expected one are all there are."""

from __future__ import annotations

import json
import uuid

import pytest
from azure.iot.device import Message
from azure.iot.hub.models import Twin, TwinProperties
from builtin_endpoint import Hub, in_thread, receive
from conftest import running_emulator
from support.dps_device import sdk_register, x509_enrollment

from azure_iot_emulator.hub.eventhub.model import partition_of

pytestmark = pytest.mark.slow

DEVICE = b"iothub-connection-device-id"
SOURCE = b"iothub-message-source"


def routes(hub_hosts: list[str]) -> list[str]:
    plain, routed, twins = hub_hosts
    return [
        "--fallback-route", f"{plain},{routed}",
        "--route", f"{routed}/twins:TwinChangeEvents",
        "--route", f"{routed}/life:DeviceLifecycleEvents",
        "--route", f"{routed}/conn:DeviceConnectionStateEvents",
        "--route", f"{routed}/alerts:DeviceMessages:level = 'alert'",
        "--route", f"{twins}/twins:TwinChangeEvents:opType = 'updateTwin'",
        "--route", f"{twins}/alerts:DeviceMessages:level = 'alert'",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def module_emulator(tmp_path_factory):
    """Overrides the shared fixture: one emulator with three hubs and the routes above."""
    data_dir = tmp_path_factory.mktemp("emulator") / "data"
    with running_emulator(data_dir, ["--assignment-delay", "immediate"], hubs=3, hub_args=routes) as emu:
        yield emu


@pytest.fixture
def hubs(module_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(module_emulator.ca_path))  # the registry's REST calls
    return [Hub(module_emulator, host, tmp_path) for host in module_emulator.hub_hosts]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def events_until(hub: Hub, device_id: str, last) -> list:
    """The device's events in its partition, from the start until one for which ``last(event)`` holds."""
    partition = str(partition_of(device_id, 4))

    def done(events) -> bool:
        return any(last(e) for e in mine(events, device_id))

    events = await receive(hub.consumer(), done, partition_id=partition, starting_position="-1")
    return mine(events, device_id)


def mine(events, device_id: str) -> list:
    return [e for e in events if e.system_properties.get(DEVICE) == device_id.encode()]


def kind(event) -> tuple[str, str]:
    """(iothub-message-source, opType or, for device messages, their level)."""
    source = event.system_properties[SOURCE].decode()
    props = event.properties or {}
    label = props.get(b"opType") or props.get(b"level") or b""
    return source, label.decode()


def telemetry(body: dict, level: str) -> Message:
    message = Message(json.dumps(body), content_encoding="utf-8", content_type="application/json")
    message.custom_properties["level"] = level
    return message


async def test_twin_changes_lifecycle_and_connection_events_reach_the_built_in_endpoint(hubs):
    hub = hubs[1]
    device_id = new_id("routed")
    client = await hub.device(device_id)  # created with the registry manager, then connected
    try:
        await client.patch_twin_reported_properties({"fw": "1.0"})
        twin = await in_thread(hub.rm.get_twin, device_id)
        patch = Twin(tags={"line": "A"}, properties=TwinProperties(desired={"interval": 5}))
        await in_thread(hub.rm.update_twin, device_id, patch, twin.etag)
        await client.send_message(telemetry({"n": 1}, "info"))  # no route matches: the fallback route
        await client.send_message(telemetry({"n": 2}, "alert"))  # the alert route (once, not twice)
    finally:
        await client.shutdown()
    await in_thread(hub.rm.delete_device, device_id)
    events = await events_until(hub, device_id, lambda e: kind(e)[1] == "deleteDeviceIdentity")
    assert [kind(e) for e in events] == [
        ("deviceLifecycleEvents", "createDeviceIdentity"),
        ("deviceConnectionStateEvents", "deviceConnected"),
        ("twinChangeEvents", "updateTwin"),
        ("twinChangeEvents", "updateTwin"),
        ("Telemetry", "info"),
        ("Telemetry", "alert"),
        ("deviceConnectionStateEvents", "deviceDisconnected"),
        ("deviceLifecycleEvents", "deleteDeviceIdentity"),
    ]
    created, connected, reported, desired, _, alert, _, deleted = events
    assert created.properties == {
        b"hubName": hub.host.encode(),
        b"deviceId": device_id.encode(),
        b"opType": b"createDeviceIdentity",
        b"iothub-message-schema": b"deviceLifecycleNotification",
        b"operationTimestamp": created.properties[b"operationTimestamp"],
    }
    assert created.content_type == "application/json"
    assert created.system_properties[b"content-encoding"] == b"utf-8"
    assert created.system_properties[b"user-id"] == hub.host.encode()
    assert created.system_properties[b"correlation-id"]
    assert b"iothub-connection-auth-method" not in created.system_properties  # the hub's own event
    body = created.body_as_json()
    assert (body["deviceId"], body["version"]) == (device_id, 1)
    assert body["properties"]["desired"]["$version"] == 1
    assert connected.properties[b"iothub-message-schema"] == b"deviceConnectionStateNotification"
    assert len(connected.body_as_json()["sequenceNumber"]) == 64
    assert reported.properties[b"iothub-message-schema"] == b"twinChangeNotification"
    reported_part = reported.body_as_json()["properties"]["reported"]
    assert (reported_part["fw"], reported_part["$version"]) == ("1.0", 2)
    assert "fw" in reported_part["$metadata"]
    change = desired.body_as_json()
    assert change["tags"] == {"line": "A"}
    assert change["properties"]["desired"]["interval"] == 5
    assert change["version"] == reported.body_as_json()["version"] + 1
    assert alert.body_as_json() == {"n": 2}
    assert alert.system_properties[SOURCE] == b"Telemetry"
    assert deleted.body_as_json()["tags"] == {"line": "A"}  # the twin as it was


async def test_a_dps_registration_raises_the_lifecycle_event_with_the_initial_twin(
    hubs, module_emulator, dps, ca, tmp_path
):
    hub = hubs[1]
    reg_id = new_id("dps-routed")
    cert = ca.issue(tmp_path, reg_id)
    initial = {"tags": {"fleet": "north"}, "properties": {"desired": {"mode": "eco"}}}
    enrollment = x509_enrollment(
        reg_id, cert.pem, allocationPolicy="static", iotHubs=[hub.host], initialTwin=initial
    )
    await dps.enrollment.create_or_update(id=reg_id, enrollment=enrollment)
    result = await sdk_register(module_emulator, reg_id, cert)
    assert result.registration_state.assigned_hub == hub.host
    events = await events_until(hub, reg_id, lambda e: kind(e)[1] == "createDeviceIdentity")
    assert [kind(e) for e in events] == [("deviceLifecycleEvents", "createDeviceIdentity")]
    twin = events[0].body_as_json()
    assert twin["tags"] == {"fleet": "north"} and twin["properties"]["desired"]["mode"] == "eco"


async def test_a_hub_without_routes_emits_no_notifications(hubs):
    hub = hubs[0]
    device_id = new_id("plain")
    client = await hub.device(device_id)
    try:
        await client.patch_twin_reported_properties({"fw": "1.0"})
        twin = await in_thread(hub.rm.get_twin, device_id)
        await in_thread(hub.rm.update_twin, device_id, Twin(tags={"x": 1}), twin.etag)
        await client.send_message(telemetry({"n": 1}, "info"))
    finally:
        await client.shutdown()
    events = await events_until(hub, device_id, lambda e: kind(e) == ("Telemetry", "info"))
    assert [kind(e) for e in events] == [("Telemetry", "info")]


async def test_a_twin_route_without_lifecycle_and_device_messages_without_the_fallback_route(hubs):
    hub = hubs[2]
    device_id = new_id("twins")
    client = await hub.device(device_id)  # no lifecycle route, no connection-state route here
    try:
        await client.patch_twin_reported_properties({"fw": "1.0"})
        await client.send_message(telemetry({"n": 1}, "info"))  # no route takes it, no fallback route
        await client.send_message(telemetry({"n": 2}, "alert"))
    finally:
        await client.shutdown()
    events = await events_until(hub, device_id, lambda e: kind(e) == ("Telemetry", "alert"))
    assert [kind(e) for e in events] == [("twinChangeEvents", "updateTwin"), ("Telemetry", "alert")]
    # The message no route took is still the hub's record of what the device sent.
    status, stored = await hub.rest("GET", f"/devices/{device_id}/messages?top=10")
    assert status == 200 and [m["body"] for m in stored] == [{"n": 1}, {"n": 2}]


async def test_a_twin_change_answered_before_a_kill_keeps_its_one_event(hubs, module_emulator):
    """The event is written in the twin's own transaction (durable before the 200): kill -9 right after the
    answer, start again, and the change and its one event are both there, in order."""
    hub = hubs[1]
    device_id = new_id("killed")
    await in_thread(hub.rm.create_device_with_sas, device_id, None, None, "enabled")
    twin = await in_thread(hub.rm.get_twin, device_id)
    updated = await in_thread(hub.rm.update_twin, device_id, Twin(tags={"k": 1}), twin.etag)
    module_emulator.kill()
    module_emulator.start()  # the same addresses, keys, data dir and routes
    assert (await in_thread(hub.rm.get_twin, device_id)).version == updated.version
    await in_thread(hub.rm.delete_device, device_id)
    events = await events_until(hub, device_id, lambda e: kind(e)[1] == "deleteDeviceIdentity")
    assert [kind(e)[1] for e in events] == ["createDeviceIdentity", "updateTwin", "deleteDeviceIdentity"]
    assert events[1].body_as_json()["tags"] == {"k": 1}
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
