"""Reading a hub's built-in endpoint in tests as a back end does: azure-eventhub's aio consumer, with a
hub's registry manager (azure-iot-hub) and X.509 devices (azure-iot-device), all unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time

import aiohttp
from azure.eventhub.aio import EventHubConsumerClient
from azure.iot.device import X509
from azure.iot.device.aio import IoTHubDeviceClient
from azure.iot.hub import IoTHubRegistryManager
from support.certs import TestCa

from azure_iot_emulator.sas import generate_sas

T = 30


async def in_thread(fn, *args):
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), T)


def parse(connection_string: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in connection_string.split(";") if part)


class Hub:
    """One hub of the module's emulator: its registry, its devices, its built-in endpoint."""

    def __init__(self, emulator, host: str, tmp_path) -> None:
        self.emulator = emulator
        self.host = host
        self.tmp_path = tmp_path
        self.eventhub = emulator.eventhub_connection_string(host)
        self.rm = IoTHubRegistryManager.from_connection_string(emulator.hub_connection_string(host))
        self.certs: dict = {}

    def consumer(self, group: str = "$Default", **kwargs) -> EventHubConsumerClient:
        return EventHubConsumerClient.from_connection_string(
            self.eventhub, consumer_group=group, connection_verify=str(self.emulator.ca_path), **kwargs
        )

    async def device(self, device_id: str, *, connect: bool = True) -> IoTHubDeviceClient:
        cert = TestCa().issue(self.tmp_path, device_id, self_signed=True)
        await in_thread(lambda: self.rm.create_device_with_x509(device_id, cert.sha1, cert.sha256, "enabled"))
        self.certs[device_id] = cert
        return await self.client(device_id, connect=connect)

    async def client(self, device_id: str, *, connect: bool = True) -> IoTHubDeviceClient:
        """A device client of a device registered by :meth:`device`."""
        cert = self.certs[device_id]
        client = IoTHubDeviceClient.create_from_x509_certificate(
            x509=X509(str(cert.cert_path), str(cert.key_path)),
            hostname=self.host,
            device_id=device_id,
            server_verification_cert=self.emulator.ca_pem,
        )
        if connect:
            await asyncio.wait_for(client.connect(), T)
        return client

    async def rest(self, method: str, path: str) -> tuple[int, object]:
        settings = parse(self.emulator.hub_connection_string(self.host))
        token = generate_sas(
            self.host, settings["SharedAccessKey"], policy="iothubowner", expiry=int(time.time()) + 600
        )
        context = ssl.create_default_context(cafile=str(self.emulator.ca_path))
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, f"https://{self.host}{path}", headers={"Authorization": token}, ssl=context
            ) as response,
        ):
            return response.status, await response.json()


async def receive(client: EventHubConsumerClient, want, **kwargs) -> list:
    """Events received (every partition unless ``partition_id``) until ``want(events)`` is true."""
    events: list = []
    errors: list = []
    done = asyncio.Event()

    async def on_event(partition_context, event):
        if event is not None:
            events.append(event)
            if want(events):
                done.set()

    async def on_error(partition_context, error):
        errors.append(error)
        done.set()

    task = asyncio.create_task(client.receive(on_event=on_event, on_error=on_error, **kwargs))
    try:
        await asyncio.wait_for(done.wait(), T)
    finally:
        await stop(client, task)
    if errors:
        raise errors[0]
    return events


async def stop(client: EventHubConsumerClient, task: asyncio.Task) -> None:
    """Close the client; its receive() may sleep out a load-balancing interval after that: cancel it."""
    await client.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
