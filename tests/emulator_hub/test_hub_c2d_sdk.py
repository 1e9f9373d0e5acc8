"""Cloud-to-device messages end to end, with the emulator running in the test's process (messages are
queued through ``HubService.send_c2d``, as its AMQP side queues them) and devices on real TLS MQTT:
azure-iot-device's ``on_message_received`` gets a message at once when connected and after connecting when
offline, never an expired one, again when the first delivery was never acknowledged; a message queued by
an emulator process that is then killed with SIGKILL reaches the device after the restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from azure.iot.device import X509
from azure.iot.device.aio import IoTHubDeviceClient
from azure.iot.hub import IoTHubRegistryManager
from conftest import free_loopback_address
from support.certs import TestCa
from support.clock import ManualClock
from support.emulator import EmulatorProcess
from support.mqtt_client import MqttTestClient, client_context
from support.waiting import until

from azure_iot_emulator.app import Emulator
from azure_iot_emulator.config import EmulatorConfig
from azure_iot_emulator.hub.c2d import C2dMessage
from azure_iot_emulator.hub.registry import DeviceSpec

pytestmark = pytest.mark.slow

T = 30  # per SDK call: some SDK failures hang forever


class Running:
    def __init__(self, emulator: Emulator, clock: ManualClock) -> None:
        assert emulator.hub is not None and emulator.connection is not None
        self.emulator = emulator
        self.clock = clock
        self.service = emulator.hub.service
        self.host = emulator.config.hub_hosts[0]
        self.ca_pem = Path(emulator.connection["ca_pem_path"]).read_text()

    def register(self, tmp_path: Path, device_id: str):
        cert = TestCa().issue(tmp_path, device_id, self_signed=True)
        spec = DeviceSpec(device_id, auth_type="selfSigned", primary_thumbprint=cert.sha1)
        self.emulator.hub.registry.create_device(self.host, spec)
        return cert

    def depth(self, device_id: str) -> int:
        return self.service.get_device(self.host, device_id)["cloudToDeviceMessageCount"]


@pytest.fixture
async def running(tmp_path):
    clock = ManualClock(datetime.now(UTC))  # moved by the tests that need expiry
    config = EmulatorConfig(
        data_dir=tmp_path / "emulator",
        dps_host=free_loopback_address(),
        hub_hosts=(free_loopback_address(),),
    ).validated()
    emulator = Emulator(config, clock)
    await emulator.start()
    try:
        yield Running(emulator, clock)
    finally:
        await emulator.stop()


def device_client(host: str, ca_pem: str, cert) -> IoTHubDeviceClient:
    return IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(cert.cert_path), str(cert.key_path)),
        hostname=host,
        device_id=cert.registration_id,
        server_verification_cert=ca_pem,
    )


@contextlib.asynccontextmanager
async def receiving(host: str, ca_pem: str, cert):
    """A connected azure-iot-device client whose C2D messages arrive in the yielded queue."""
    client = device_client(host, ca_pem, cert)
    inbox: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(client.connect(), T)
    # The setter blocks until the SDK subscribed (and this loop serves the emulator): set it from a thread.
    handler = lambda m: loop.call_soon_threadsafe(inbox.put_nowait, m)  # noqa: E731
    await asyncio.wait_for(asyncio.to_thread(setattr, client, "on_message_received", handler), T)
    try:
        yield inbox
    finally:
        await asyncio.wait_for(client.shutdown(), T)


async def next_message(inbox: asyncio.Queue):
    return await asyncio.wait_for(inbox.get(), T)


async def test_a_connected_device_gets_the_message_at_once_with_its_properties(running, tmp_path):
    cert = running.register(tmp_path, "c2d-live")
    async with receiving(running.host, running.ca_pem, cert) as inbox:
        await until(lambda: running.service.is_connected(running.host, "c2d-live"), "device connected")
        message = C2dMessage(
            b'{"cmd": "blink"}',
            message_id="m-1",
            correlation_id="req-7",
            ack="full",
            properties={"line": "A/1 & 2"},
            content_type="application/json",
            content_encoding="utf-8",
        )
        await running.service.send_c2d(running.host, "c2d-live", message)
        received = await next_message(inbox)
        assert received.data == b'{"cmd": "blink"}'
        assert (received.message_id, received.correlation_id, received.ack) == ("m-1", "req-7", "full")
        assert (received.content_type, received.content_encoding) == ("application/json", "utf-8")
        assert received.custom_properties == {"line": "A/1 & 2"}
        await until(lambda: running.depth("c2d-live") == 0, "the PUBACK took it off the queue")


async def test_an_offline_device_gets_its_queue_on_connect_in_order_never_an_expired_one(running, tmp_path):
    cert = running.register(tmp_path, "c2d-offline")
    now = running.clock()
    expiring = C2dMessage(b"expires", message_id="old", expiry=now + timedelta(seconds=10))
    await running.service.send_c2d(running.host, "c2d-offline", expiring)
    await running.service.send_c2d(running.host, "c2d-offline", C2dMessage(b"first", message_id="m-1"))
    await running.service.send_c2d(running.host, "c2d-offline", C2dMessage(b"second", message_id="m-2"))
    running.clock.advance(11)
    async with receiving(running.host, running.ca_pem, cert) as inbox:
        first, second = await next_message(inbox), await next_message(inbox)
        await until(lambda: running.depth("c2d-offline") == 0, "both acknowledged")
    assert [first.message_id, second.message_id] == ["m-1", "m-2"]  # FIFO, and "old" never came first
    assert inbox.empty()


async def test_a_message_never_acknowledged_is_delivered_again(running, tmp_path):
    cert = running.register(tmp_path, "c2d-again")
    username = f"{running.host}/c2d-again/?api-version=2021-04-12"
    context = client_context(running.ca_pem, str(cert.cert_path), str(cert.key_path))
    # A clean session: its subscription ends with it, so the message goes out again only once the SDK
    # below has subscribed with its handler set (a kept one would deliver it at CONNECT, before the handler).
    raw, connack = await MqttTestClient.connect(
        running.host, context, client_id="c2d-again", username=username, clean_session=True
    )
    assert connack.return_code == 0
    raw.auto_ack = False  # a device that dies before its PUBACK
    await raw.subscribe("devices/c2d-again/messages/devicebound/#")
    await running.service.send_c2d(running.host, "c2d-again", C2dMessage(b"once more", message_id="m-1"))
    first = await raw.next_publish()
    assert (first.payload, first.qos) == (b"once more", 1)
    await raw.close()
    await until(lambda: not running.service.is_connected(running.host, "c2d-again"), "device gone")
    assert running.depth("c2d-again") == 1
    async with receiving(running.host, running.ca_pem, cert) as inbox:
        again = await next_message(inbox)
        assert (again.data, again.message_id) == (b"once more", "m-1")
        await until(lambda: running.depth("c2d-again") == 0, "acknowledged this time")


def _ask(proc: subprocess.Popen, request: dict) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(request) + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


async def test_a_queued_message_survives_kill_9_of_the_emulator(tmp_path, monkeypatch):
    data_dir = tmp_path / "emulator"
    dps_host, hub_host = free_loopback_address(), free_loopback_address()
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("c2d_sender.py")), str(data_dir), dps_host, hub_host],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    restarted = EmulatorProcess(data_dir, dps_host=dps_host, hub_hosts=[hub_host])
    try:
        assert await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), T) == "ready\n"
        connection = json.loads((data_dir / "connection.json").read_text())
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", connection["ca_pem_path"])
        rm = IoTHubRegistryManager.from_connection_string(connection["hubs"][0]["connection_string"])
        cert = TestCa().issue(tmp_path, "c2d-durable", self_signed=True)
        await asyncio.to_thread(rm.create_device_with_x509, "c2d-durable", cert.sha1, cert.sha256, "enabled")
        request = {"device": "c2d-durable", "body": "survives", "message_id": "m-kill"}
        assert await asyncio.wait_for(asyncio.to_thread(_ask, child, request), T) == "sent m-kill"
        child.kill()  # SIGKILL right after send_c2d returned
        child.wait(T)
        await asyncio.to_thread(restarted.start)
        async with receiving(hub_host, restarted.ca_pem, cert) as inbox:
            received = await next_message(inbox)
        assert (received.data, received.message_id) == (b"survives", "m-kill")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        restarted.stop()
        restarted.kill()
