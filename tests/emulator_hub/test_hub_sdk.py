"""The IoT Hub half against a real emulator process, with Microsoft's SDKs unchanged:
azure-iot-device (aio IoTHubDeviceClient, X.509) and azure-iot-hub (IoTHubRegistryManager, in a thread)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys

import pytest
from azure.iot.device import X509, Message, MethodResponse
from azure.iot.device.aio import IoTHubDeviceClient
from azure.iot.device.exceptions import CredentialError
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties
from msrest.exceptions import HttpOperationError
from support.certs import TestCa
from support.waiting import until

T = 30  # generous per-call timeout: some SDK failures hang forever


async def sdk(coro, timeout: float = T):
    return await asyncio.wait_for(coro, timeout)


async def in_thread(fn, *args):
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), T)


def _hub(emulator, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))
    host = emulator.default_hub
    conn = dict(zip(emulator.hub_hosts, emulator.hub_connection_strings, strict=True))[host]
    return emulator, host, IoTHubRegistryManager.from_connection_string(conn)


@pytest.fixture
def hub(module_emulator, monkeypatch):
    """(emulator, hub host, registry manager) with the emulator CA trusted for REST: the module's emulator
    (every test uses device ids of its own)."""
    return _hub(module_emulator, monkeypatch)


@pytest.fixture
def own_hub(emulator, monkeypatch):
    """:func:`hub` on an emulator of the test's own, for a test that restarts it."""
    return _hub(emulator, monkeypatch)


async def register(rm, tmp_path, device_id):
    cert = TestCa().issue(tmp_path, device_id, self_signed=True)
    await in_thread(lambda: rm.create_device_with_x509(device_id, cert.sha1, cert.sha256, "enabled"))
    return cert


async def patch_with_version(patches: asyncio.Queue, version: int) -> dict:
    """The SDK also delivers patches it synthesises itself (after its own twin GET on connect): skip
    older versions."""
    while True:
        patch = await asyncio.wait_for(patches.get(), T)
        if patch["$version"] >= version:
            assert patch["$version"] == version, patch
            return patch


def device_client(emulator, host, cert, **kwargs) -> IoTHubDeviceClient:
    return IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(cert.cert_path), str(cert.key_path)),
        hostname=host,
        device_id=cert.registration_id,
        server_verification_cert=emulator.ca_pem,
        **kwargs,
    )


def cli(emulator, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "azure_iot_emulator", *args, "--data-dir", str(emulator.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
async def test_telemetry_with_properties_is_stored_and_readable(hub, tmp_path):
    emulator, host, rm = hub
    cert = await register(rm, tmp_path, "tele-1")
    client = device_client(emulator, host, cert)
    monitor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "azure_iot_emulator",
            "monitor",
            "--data-dir",
            str(emulator.data_dir),
            "--device",
            "tele-1",
            "--json",
            "--last",
            "1",  # the message even when the monitor starts after it was stored (a loaded machine)
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        await sdk(client.connect())
        device = await in_thread(rm.get_device, "tele-1")
        assert device.connection_state == "Connected"
        message = Message(
            json.dumps({"temperature": 21.5}),
            message_id="m-1",
            content_encoding="utf-8",
            content_type="application/json",
        )
        message.custom_properties["alert"] = "hi there"
        message.custom_properties["line"] = "A/1&2"
        await sdk(client.send_message(message))
        line = await asyncio.wait_for(asyncio.to_thread(monitor.stdout.readline), T)
    finally:
        monitor.terminate()
        monitor.wait(10)
        await sdk(client.shutdown())
    live = json.loads(line)
    assert live["body"] == {"temperature": 21.5}
    assert live["properties"] == {"alert": "hi there", "line": "A/1&2"}
    assert live["systemProperties"]["messageId"] == "m-1"
    assert live["systemProperties"]["contentType"] == "application/json"
    stored = cli(emulator, "messages", "--device", "tele-1", "--json")
    assert stored.returncode == 0, stored.stderr
    assert [json.loads(x)["properties"] for x in stored.stdout.splitlines()] == [live["properties"]]
    assert json.loads(stored.stdout.splitlines()[0])["enqueuedTimeUtc"].endswith("Z")
    assert (await in_thread(rm.get_device, "tele-1")).connection_state == "Disconnected"


@pytest.mark.slow
async def test_twin_reported_and_desired_live_and_after_reconnect(hub, tmp_path):
    emulator, host, rm = hub
    cert = await register(rm, tmp_path, "twin-1")
    client = device_client(emulator, host, cert)
    patches: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    # the SDK calls handlers from its own threads: hand patches over thread-safely
    client.on_twin_desired_properties_patch_received = lambda p: loop.call_soon_threadsafe(
        patches.put_nowait, p
    )
    try:
        await sdk(client.connect())
        twin = await sdk(client.get_twin())
        assert twin["desired"]["$version"] == 1 and twin["reported"]["$version"] == 1
        await sdk(client.patch_twin_reported_properties({"fw": "1.0", "net": {"rssi": -60}}))
        service_twin = await in_thread(rm.get_twin, "twin-1")
        assert service_twin.properties.reported["fw"] == "1.0"
        assert service_twin.properties.reported["$version"] == 2
        # desired patch while connected
        await in_thread(
            rm.update_twin,
            "twin-1",
            Twin(properties=TwinProperties(desired={"interval": 5})),
            service_twin.etag,
        )
        patch = await patch_with_version(patches, 2)
        assert patch["interval"] == 5
        # desired patch while disconnected arrives after reconnect (SDK: twin GET + version compare)
        await sdk(client.disconnect())
        await in_thread(rm.update_twin, "twin-1", Twin(properties=TwinProperties(desired={"interval": 10})))
        await sdk(client.connect())
        patch = await patch_with_version(patches, 3)
        assert patch["interval"] == 10
        twin = await sdk(client.get_twin())
        assert twin["desired"]["interval"] == 10 and twin["reported"]["net"] == {"rssi": -60}
    finally:
        await sdk(client.shutdown())


@pytest.mark.slow
async def test_direct_method_round_trip_and_offline_404(hub, tmp_path):
    emulator, host, rm = hub
    cert = await register(rm, tmp_path, "meth-1")
    client = device_client(emulator, host, cert)

    async def on_method(request):
        payload = {"echo": request.payload, "name": request.name}
        await client.send_method_response(MethodResponse.create_from_method_request(request, 201, payload))

    client.on_method_request_received = on_method
    try:
        await sdk(client.connect())
        result = await in_thread(
            rm.invoke_device_method,
            "meth-1",
            CloudToDeviceMethod(method_name="ping", payload={"n": 1}, response_timeout_in_seconds=10),
        )
        assert result.status == 201
        assert result.payload == {"echo": {"n": 1}, "name": "ping"}
    finally:
        await sdk(client.shutdown())
    with pytest.raises(HttpOperationError) as info:
        await in_thread(
            rm.invoke_device_method, "meth-1", CloudToDeviceMethod(method_name="ping", payload={})
        )
    assert info.value.response.status_code == 404


@pytest.mark.slow
async def test_registry_manager_etags_and_delete_refuses_device(hub, tmp_path):
    emulator, host, rm = hub
    cert = await register(rm, tmp_path, "reg-1")
    twin = await in_thread(rm.get_twin, "reg-1")
    with pytest.raises(HttpOperationError) as info:
        await in_thread(rm.update_twin, "reg-1", Twin(tags={"a": 1}), "AAAAAAAAAAA=")
    assert info.value.response.status_code == 412
    updated = await in_thread(rm.update_twin, "reg-1", Twin(tags={"a": 1}), twin.etag)
    assert updated.tags == {"a": 1}
    client = device_client(emulator, host, cert, connection_retry=False)
    await sdk(client.connect())
    await in_thread(rm.delete_device, "reg-1")
    with pytest.raises(HttpOperationError) as info:
        await in_thread(rm.get_device, "reg-1")
    assert info.value.response.status_code == 404
    # The hub drops a deleted device's connection: shut down once the SDK has seen it (a shutdown racing
    # with the drop fails inside the SDK with NoConnectionError).
    await until(lambda: not client.connected, "the SDK to see the deleted device's connection dropped")
    await sdk(client.shutdown())
    again = device_client(emulator, host, cert, connection_retry=False)
    with pytest.raises(CredentialError):
        await sdk(again.connect())
    await sdk(again.shutdown())


async def test_unregistered_thumbprint_and_disabled_device_are_refused(hub, tmp_path):
    emulator, host, rm = hub
    await register(rm, tmp_path, "known-1")
    other_dir = tmp_path / "impostor"
    other_dir.mkdir()
    # same CN, another key: another thumbprint
    impostor = TestCa().issue(other_dir, "known-1", self_signed=True)
    client = device_client(emulator, host, impostor, connection_retry=False)
    with pytest.raises(CredentialError):
        await sdk(client.connect())
    await sdk(client.shutdown())
    cert = await register(rm, tmp_path, "off-1")
    device = await in_thread(rm.get_device, "off-1")
    await in_thread(
        lambda: rm.update_device_with_x509("off-1", device.etag, cert.sha1, cert.sha256, "disabled")
    )
    client = device_client(emulator, host, cert, connection_retry=False)
    with pytest.raises(CredentialError):
        await sdk(client.connect())
    await sdk(client.shutdown())


@pytest.mark.slow
async def test_initial_twin_from_dps_enrollment_reaches_the_device(module_emulator, tmp_path):
    from azure.iot.device.aio import ProvisioningDeviceClient
    from azure.iot.deviceprovisioning import DeviceProvisioningClient

    cert = TestCa().issue(tmp_path, "dps-twin-1", self_signed=True)
    dps = DeviceProvisioningClient.from_connection_string(
        module_emulator.dps_connection_string, connection_verify=str(module_emulator.ca_path)
    )
    dps.enrollment.create_or_update(
        id="dps-twin-1",
        enrollment={
            "registrationId": "dps-twin-1",
            "provisioningStatus": "enabled",
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": cert.cert_path.read_text()}}},
            },
            "initialTwin": {"tags": {"line": "A"}, "properties": {"desired": {"fw": "1.0"}}},
        },
    )
    x509 = X509(str(cert.cert_path), str(cert.key_path))
    pdc = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=module_emulator.dps_host,
        registration_id="dps-twin-1",
        id_scope=module_emulator.id_scope,
        x509=x509,
        server_verification_cert=module_emulator.ca_pem,
    )
    result = await sdk(pdc.register())
    assert result.status == "assigned"
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509,
        hostname=result.registration_state.assigned_hub,
        device_id=result.registration_state.device_id,
        server_verification_cert=module_emulator.ca_pem,
    )
    try:
        await sdk(client.connect())
        twin = await sdk(client.get_twin())
        assert twin["desired"]["fw"] == "1.0"
    finally:
        await sdk(client.shutdown())


@pytest.mark.slow
async def test_restart_keeps_identities_twins_telemetry_and_subscriptions(own_hub, tmp_path):
    emulator, host, rm = own_hub
    cert = await register(rm, tmp_path, "persist-1")
    client = device_client(emulator, host, cert, connection_retry_interval=1)
    patches: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    client.on_twin_desired_properties_patch_received = lambda p: loop.call_soon_threadsafe(
        patches.put_nowait, p
    )
    try:
        await sdk(client.connect())
        await sdk(client.send_message(Message("before restart")))
        await sdk(client.patch_twin_reported_properties({"boot": 1}))
        await asyncio.wait_for(asyncio.to_thread(emulator.restart), 60)
        conn = dict(zip(emulator.hub_hosts, emulator.hub_connection_strings, strict=True))[host]
        rm = IoTHubRegistryManager.from_connection_string(conn)

        async def connected() -> bool:
            return (await in_thread(rm.get_device, "persist-1")).connection_state == "Connected"

        # the SDK reconnects by itself (retry interval 1 s)
        await until(connected, "the device reconnected after the restart", interval=0.1)
        twin = await in_thread(rm.get_twin, "persist-1")
        assert twin.properties.reported["boot"] == 1
        # the SDK never re-subscribes: the desired subscription must have survived the restart
        await in_thread(rm.update_twin, "persist-1", Twin(properties=TwinProperties(desired={"after": True})))
        patch = await patch_with_version(patches, 2)
        assert patch["after"] is True
        await sdk(client.send_message(Message("after restart")))
    finally:
        await sdk(client.shutdown())
    stored = cli(emulator, "messages", "--device", "persist-1", "--json")
    assert [json.loads(x)["body"] for x in stored.stdout.splitlines()] == ["before restart", "after restart"]


@pytest.mark.slow
async def test_sas_device_connects_with_its_connection_string(hub):
    emulator, host, rm = hub
    device = await in_thread(lambda: rm.create_device_with_sas("sas-1", "", "", "enabled"))
    key = device.authentication.symmetric_key.primary_key
    assert key
    client = IoTHubDeviceClient.create_from_connection_string(
        f"HostName={host};DeviceId=sas-1;SharedAccessKey={key}", server_verification_cert=emulator.ca_pem
    )
    try:
        await sdk(client.connect())
        await sdk(client.send_message(Message("via sas")))
    finally:
        await sdk(client.shutdown())
    stored = cli(emulator, "messages", "--device", "sas-1", "--json")
    assert [json.loads(x)["body"] for x in stored.stdout.splitlines()] == ["via sas"]
    wrong = IoTHubDeviceClient.create_from_connection_string(
        f"HostName={host};DeviceId=sas-1;SharedAccessKey={base64.b64encode(b'x' * 32).decode()}",
        server_verification_cert=emulator.ca_pem,
        connection_retry=False,
    )
    with pytest.raises(CredentialError):
        await sdk(wrong.connect())
    await sdk(wrong.shutdown())
