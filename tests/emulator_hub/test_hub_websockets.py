"""MQTT over WebSockets on port 443 (``/$iothub/websocket``, subprotocol ``mqtt``) with azure-iot-device's
clients unchanged and ``websockets=True``: a device registers with DPS and talks to its hub, by X.509 and
by SAS, under the same authentication rules as port 8883."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest
from azure.iot.device import X509, Message
from azure.iot.device.aio import IoTHubDeviceClient, ProvisioningDeviceClient
from azure.iot.device.exceptions import CredentialError
from azure.iot.hub import IoTHubRegistryManager
from support.certs import TestCa
from support.dps_device import x509_enrollment
from test_hub_mqtt_raw import stored

T = 60


async def sdk(coro):
    return await asyncio.wait_for(coro, T)


@pytest.fixture
def hub(module_emulator, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(module_emulator.ca_path))
    assert module_emulator.https_port == 443
    host = module_emulator.default_hub
    return module_emulator, host, IoTHubRegistryManager.from_connection_string(
        module_emulator.hub_connection_strings[0]
    )


@pytest.mark.slow
async def test_device_registers_and_sends_over_websockets(hub, dps, tmp_path):
    emulator, host, _ = hub
    cert = TestCa().issue(tmp_path, "ws-x509", self_signed=True)
    await dps.enrollment.create_or_update(
        id="ws-x509", enrollment=x509_enrollment("ws-x509", cert.cert_path.read_text(), iotHubHostName=host)
    )
    x509 = X509(str(cert.cert_path), str(cert.key_path))
    registration = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=emulator.dps_host,
        registration_id="ws-x509",
        id_scope=emulator.id_scope,
        x509=x509,
        server_verification_cert=emulator.ca_pem,
        websockets=True,
    )
    result = await sdk(registration.register())
    assert result.status == "assigned" and result.registration_state.assigned_hub == host
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509, hostname=host, device_id="ws-x509", server_verification_cert=emulator.ca_pem,
        websockets=True,
    )
    try:
        await sdk(client.connect())
        await sdk(client.send_message(Message("over websockets")))
        await sdk(client.patch_twin_reported_properties({"transport": "ws"}))
        twin = await sdk(client.get_twin())
        assert twin["reported"]["transport"] == "ws"
    finally:
        await sdk(client.shutdown())
    messages = await stored(emulator, "ws-x509")
    assert [m["body"] for m in messages] == ["over websockets"]


async def test_sas_rules_are_those_of_8883(hub):
    emulator, host, rm = hub
    device = await asyncio.to_thread(rm.create_device_with_sas, "ws-sas", "", "", "enabled")
    key = device.authentication.symmetric_key.primary_key
    good = IoTHubDeviceClient.create_from_connection_string(
        f"HostName={host};DeviceId=ws-sas;SharedAccessKey={key}",
        server_verification_cert=emulator.ca_pem, websockets=True,
    )
    try:
        await sdk(good.connect())
        await sdk(good.send_message(Message(json.dumps({"via": "ws"}))))
    finally:
        await sdk(good.shutdown())
    wrong = IoTHubDeviceClient.create_from_connection_string(
        f"HostName={host};DeviceId=ws-sas;SharedAccessKey={base64.b64encode(b'x' * 32).decode()}",
        server_verification_cert=emulator.ca_pem, websockets=True, connection_retry=False,
    )
    with pytest.raises(CredentialError):
        await sdk(wrong.connect())
    await sdk(wrong.shutdown())


async def test_the_websocket_path_needs_the_mqtt_subprotocol(hub):
    emulator, host, _ = hub
    import ssl

    ctx = ssl.create_default_context(cadata=emulator.ca_pem)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://{host}:443/$iothub/websocket", ssl=ctx) as plain:
            assert plain.status == 400  # not an upgrade
        async with http.ws_connect(f"wss://{host}:443/$iothub/websocket", protocols=("chat",), ssl=ctx) as ws:
            message = await ws.receive()
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
