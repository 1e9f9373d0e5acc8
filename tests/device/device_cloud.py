"""Test helper: the operator's side of the cloud, through Microsoft's service SDKs against the emulator
(enroll / enable a device in DPS, delete it from its hub, change its desired properties)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient


def _dps(emulator) -> DeviceProvisioningClient:
    return DeviceProvisioningClient.from_connection_string(
        emulator.dps_connection_string, connection_verify=str(emulator.ca_path)
    )


async def enroll(
    emulator,
    guid: str,
    leaf_pem: str,
    *,
    enabled: bool,
    initial_twin: dict | None = None,
    hub: str | None = None,
) -> None:
    """An individual X.509 enrollment, statically allocated to ``hub`` (default: the default hub)."""
    body: dict[str, Any] = {
        "registrationId": guid,
        "deviceId": guid,
        "provisioningStatus": "enabled" if enabled else "disabled",
        "allocationPolicy": "static",
        "iotHubs": [hub or emulator.default_hub],
        "attestation": {
            "type": "x509",
            "x509": {"clientCertificates": {"primary": {"certificate": leaf_pem}}},
        },
    }
    if initial_twin is not None:
        body["initialTwin"] = initial_twin
    async with _dps(emulator) as client:
        await client.enrollment.create_or_update(id=guid, enrollment=body)


async def activate(emulator, guid: str, *, initial_twin: dict | None = None, hub: str | None = None) -> None:
    async with _dps(emulator) as client:
        current = await client.enrollment.get(id=guid)
        current["provisioningStatus"] = "enabled"
        if initial_twin is not None:
            current["initialTwin"] = initial_twin
        if hub is not None:
            current["allocationPolicy"] = "static"
            current["iotHubs"] = [hub]
        await client.enrollment.create_or_update(id=guid, enrollment=current, if_match=current.get("etag"))


async def deactivate(emulator, guid: str) -> None:
    """Disable the enrollment and remove the device from its hub (what an operator's deprovision does)."""
    async with _dps(emulator) as client:
        current = await client.enrollment.get(id=guid)
        current["provisioningStatus"] = "disabled"
        await client.enrollment.create_or_update(id=guid, enrollment=current, if_match=current.get("etag"))
    await delete_hub_device(emulator, guid)


def _registry(emulator, hub: str | None = None):
    from azure.iot.hub import IoTHubRegistryManager

    hubs = dict(zip(emulator.hub_hosts, emulator.hub_connection_strings, strict=True))
    return IoTHubRegistryManager.from_connection_string(hubs[hub or emulator.default_hub])


async def delete_hub_device(emulator, device_id: str, hub: str | None = None) -> None:
    def go() -> None:
        _registry(emulator, hub).delete_device(device_id)

    await asyncio.to_thread(go)


async def set_desired(emulator, device_id: str, desired: dict, hub: str | None = None) -> None:
    from azure.iot.hub.models import Twin, TwinProperties

    def go() -> None:
        reg = _registry(emulator, hub)
        reg.update_twin(device_id, Twin(properties=TwinProperties(desired=desired)), "*")

    await asyncio.to_thread(go)


async def get_twin(emulator, device_id: str, hub: str | None = None) -> Any:
    return await asyncio.to_thread(lambda: _registry(emulator, hub).get_twin(device_id))


async def received_telemetry(emulator, device_id: str, hub: str | None = None) -> list[dict[str, Any]]:
    """What the hub received from the device, oldest first, read as any back end reads it: from the hub's
    built-in Event Hub-compatible endpoint with azure-eventhub, every partition from its start up to its last
    event at the time of the call."""
    from azure.eventhub.aio import EventHubConsumerClient

    client = EventHubConsumerClient.from_connection_string(
        emulator.eventhub_connection_string(hub or emulator.default_hub),
        consumer_group="$Default",
        connection_verify=str(emulator.ca_path),
    )
    events: list[Any] = []
    async with client:
        ends = {}
        for partition in await client.get_partition_ids():
            properties = await client.get_partition_properties(partition)
            if not properties["is_empty"]:
                ends[partition] = properties["last_enqueued_sequence_number"]
        remaining, done = set(ends), asyncio.Event()

        async def on_event(context, event) -> None:
            if event is None or context.partition_id not in remaining:
                return
            if event.system_properties.get(b"iothub-connection-device-id") == device_id.encode():
                events.append(event)
            if event.sequence_number >= ends[context.partition_id]:
                remaining.discard(context.partition_id)
                if not remaining:
                    done.set()

        if remaining:
            reading = asyncio.create_task(client.receive(on_event, starting_position="-1"))
            try:
                await asyncio.wait_for(done.wait(), 60)
            finally:
                await client.close()
                await reading
    out = []
    for event in sorted(events, key=lambda e: e.sequence_number):
        try:
            body = json.loads(event.body_as_str())
        except ValueError:
            body = {}
        system = event.system_properties
        out.append(
            {
                "seq": body.get("seq") if isinstance(body, dict) else None,
                "message_id": event.message_id,
                "content_type": event.content_type,
                "content_encoding": _text(system.get(b"content-encoding")),
                "enqueued_time": event.enqueued_time.isoformat() if event.enqueued_time else None,
                "body": body if isinstance(body, dict) else {},
            }
        )
    return out


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
