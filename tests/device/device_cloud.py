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


def _sas_for(connection_string: str) -> tuple[str, str]:
    """(HostName, Authorization header) for a hub service connection string (iothubowner)."""
    import base64
    import hashlib
    import hmac
    import time
    from urllib.parse import quote, quote_plus

    parts = dict(p.split("=", 1) for p in connection_string.split(";") if p)
    host = parts["HostName"]
    expiry = int(time.time()) + 600
    sr = quote_plus(host)
    digest = hmac.new(base64.b64decode(parts["SharedAccessKey"]), f"{sr}\n{expiry}".encode(), hashlib.sha256)
    sig = quote(base64.b64encode(digest.digest()).decode(), safe="")
    return host, f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn={parts['SharedAccessKeyName']}"


async def received_telemetry(emulator, device_id: str, hub: str | None = None) -> list[dict[str, Any]]:
    """What the hub received from the device, oldest first (the emulator's telemetry REST extension)."""
    import ssl

    import aiohttp

    hubs = dict(zip(emulator.hub_hosts, emulator.hub_connection_strings, strict=True))
    host, auth = _sas_for(hubs[hub or emulator.default_hub])
    ctx = ssl.create_default_context(cafile=str(emulator.ca_path))
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"https://{host}/devices/{device_id}/messages",
            params={"top": "1000", "api-version": "2021-04-12"},
            headers={"Authorization": auth},
            ssl=ctx,
        ) as resp,
    ):
        resp.raise_for_status()
        messages = await resp.json()
    out = []
    for m in messages:
        body = m["body"] if isinstance(m["body"], dict) else {}
        sysprops = m.get("systemProperties", {})
        out.append(
            {
                "seq": body.get("seq"),
                "message_id": sysprops.get("messageId"),
                "content_type": sysprops.get("contentType"),
                "content_encoding": sysprops.get("contentEncoding"),
                "enqueued_time": m.get("enqueuedTimeUtc"),
                "body": body,
            }
        )
    return out
