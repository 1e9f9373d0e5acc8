"""Test helper: the operator's side of the cloud, through Microsoft's service SDKs against the emulator
(enroll / enable a device in DPS, delete it from its hub, change its desired properties)."""

from __future__ import annotations

import asyncio
from typing import Any

from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient


def _dps(emulator) -> DeviceProvisioningClient:
    return DeviceProvisioningClient.from_connection_string(
        emulator.dps_connection_string, connection_verify=str(emulator.ca_path)
    )


async def enroll(
    emulator, guid: str, leaf_pem: str, *, enabled: bool, initial_twin: dict | None = None
) -> None:
    body: dict[str, Any] = {
        "registrationId": guid,
        "deviceId": guid,
        "provisioningStatus": "enabled" if enabled else "disabled",
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
