"""The hub endpoint keeps a device's publishes in arrival order although the MQTT core hands over the
next batch before the previous one is done: telemetry read after a batch that needs a task (a twin
request among telemetry) is stored after that batch's telemetry, never before it."""

from __future__ import annotations

import asyncio

from test_hub_service_ingest import service  # noqa: F401 - a fixture

from azure_iot_emulator.hub.endpoint import HubEndpoint
from azure_iot_emulator.mqtt.packets import Publish


class DeviceLink:
    """What the core's Link offers the endpoint, for one device without a socket."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.sent.append((topic, payload))

    def is_subscribed(self, topic: str) -> bool:
        return True

    def close(self) -> None:
        pass


def telemetry(body: bytes, packet_id: int) -> Publish:
    return Publish("devices/d/messages/events/", body, 1, packet_id)


async def test_telemetry_after_a_mixed_batch_is_stored_after_it(service):  # noqa: F811
    endpoint = HubEndpoint("h", service)
    link = DeviceLink("d")
    twin_get = Publish("$iothub/twin/GET/?$rid=7", b"", 1, 2)
    first = endpoint.submit_publishes(link, [telemetry(b"A", 1), twin_get], None)
    second = endpoint.submit_publishes(link, [telemetry(b"B", 3)], first)
    third = endpoint.submit_publishes(link, [telemetry(b"C", 4)], second)
    await asyncio.gather(first, second, third)
    stored = service.telemetry.recent(hub="h", device_id="d")
    assert [m.body for m in stored] == [b"A", b"B", b"C"]
    await asyncio.sleep(0)
    assert [topic for topic, _ in link.sent] == ["$iothub/twin/res/404/?$rid=7"]  # not registered here


async def test_a_batch_after_a_failed_one_is_not_stored(service):  # noqa: F811
    endpoint = HubEndpoint("h", service)
    link = DeviceLink("d")
    other_device = Publish("devices/e/messages/events/", b"not yours", 1, 2)
    first = endpoint.submit_publishes(link, [telemetry(b"A", 1), other_device], None)
    second = endpoint.submit_publishes(link, [telemetry(b"B", 3)], first)
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["ProtocolViolation", "ConnectionError"]
    assert results[0].handled == 1
    assert [m.body for m in service.telemetry.recent(hub="h", device_id="d")] == [b"A"]
