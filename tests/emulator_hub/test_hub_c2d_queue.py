"""Cloud-to-device messages in the hub domain, without sockets: Azure's limits and refusals (a refusal
changes no queue), expiry, FIFO delivery to a subscribed connection, removal on PUBACK only, redelivery on
the next connection, the delivery-count limit, purge, the queue depth in the device and twin documents,
and the property bag as azure-iot-device parses it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from azure.iot.device import Message
from azure.iot.device.iothub.pipeline import mqtt_topic_iothub
from support.clock import START, ManualClock
from test_hub_registry import db  # noqa: F401 - a fixture

from azure_iot_emulator.hub import c2d
from azure_iot_emulator.hub.c2d import C2dLimits, C2dMessage, C2dRefused
from azure_iot_emulator.hub.registry import DeviceSpec, HubRegistry
from azure_iot_emulator.hub.service import HubError, HubService
from azure_iot_emulator.hub.telemetry import TelemetryStore
from azure_iot_emulator.store import Database

HUB = "h"


class Channel:
    """A device connection as the hub domain sees it; the test plays the device's PUBACKs."""

    def __init__(self, subscribed: bool = True) -> None:
        self.subscribed = subscribed
        self.sent: list[tuple[str, bytes, object]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        raise AssertionError("C2D messages go out through publish_acked")

    def publish_acked(self, topic: str, payload: bytes, on_ack) -> None:
        self.sent.append((topic, payload, on_ack))

    def is_subscribed(self, topic: str) -> bool:
        return self.subscribed and topic.startswith("devices/")

    def close(self) -> None:
        pass

    def bodies(self) -> list[bytes]:
        return [body for _, body, _ in self.sent]

    def ack_all(self) -> None:
        for _, _, on_ack in self.sent:
            on_ack()


def build(database: Database, clock: ManualClock, limits: C2dLimits | None = None) -> HubService:
    registry = HubRegistry(database, [HUB], clock)
    return HubService(registry, TelemetryStore(database, clock), clock, c2d_limits=limits)


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def service(db, clock):  # noqa: F811
    hub = build(db, clock)
    for device_id in ("d1", "d2"):
        hub.registry.create_device(HUB, DeviceSpec(device_id, auth_type="sas"))
    return hub


def depth(service: HubService, device_id: str) -> int:
    return service.get_device(HUB, device_id)["cloudToDeviceMessageCount"]


async def refused(service: HubService, device_id: str, message: C2dMessage) -> C2dRefused:
    with pytest.raises(C2dRefused) as caught:
        await service.send_c2d(HUB, device_id, message)
    return caught.value


async def test_unknown_device_is_refused_not_found(service):
    await service.send_c2d(HUB, "d1", C2dMessage(b"kept"))
    for device_id in ("nobody", "bad/id"):
        error = await refused(service, device_id, C2dMessage(b"x"))
        assert error.condition in (c2d.NOT_FOUND, c2d.ARGUMENT_ERROR)
    assert (await refused(service, "nobody", C2dMessage(b"x"))).condition == "amqp:not-found"
    assert (depth(service, "d1"), depth(service, "d2")) == (1, 0)


async def test_the_51st_message_is_refused_and_room_comes_back_as_messages_expire(service, clock):
    for i in range(c2d.MAX_QUEUE_DEPTH):
        await service.send_c2d(HUB, "d1", C2dMessage(b"m%d" % i, expiry=START + timedelta(seconds=10 + i)))
    error = await refused(service, "d1", C2dMessage(b"one too many"))
    assert error.condition == "amqp:resource-limit-exceeded" and "403004" in error.description
    assert depth(service, "d1") == 50
    await service.send_c2d(HUB, "d2", C2dMessage(b"another device's queue is its own"))
    clock.advance(10.5)  # the first message expired: one free place
    await service.send_c2d(HUB, "d1", C2dMessage(b"fits"))
    assert (await refused(service, "d1", C2dMessage(b"full again"))).condition == c2d.QUEUE_FULL
    channel = Channel()
    service.attach(HUB, "d1", channel)
    assert channel.bodies() == [b"m%d" % i for i in range(1, 50)] + [b"fits"]


async def test_size_limit_counts_body_and_properties(service):
    await service.send_c2d(HUB, "d1", C2dMessage(b"x" * c2d.MAX_MESSAGE_BYTES))
    error = await refused(service, "d1", C2dMessage(b"x" * (c2d.MAX_MESSAGE_BYTES - 1), message_id="mm"))
    assert error.condition == "amqp:link:message-size-exceeded"
    error = await refused(service, "d1", C2dMessage(b"", properties={"k": "v" * c2d.MAX_MESSAGE_BYTES}))
    assert error.condition == c2d.TOO_LARGE
    # within 64 KB, but three times that once URL-encoded into the MQTT topic: could never be delivered
    error = await refused(service, "d1", C2dMessage(b"", properties={"k": "/" * 30000}))
    assert error.condition == c2d.TOO_LARGE and "topic" in error.description
    assert depth(service, "d1") == 1


@pytest.mark.parametrize(
    "message",
    [
        C2dMessage(b"", message_id="m" * 129),
        C2dMessage(b"", message_id=""),
        C2dMessage(b"", message_id="has space"),
        C2dMessage(b"", message_id="é"),
        C2dMessage(b"", ack="sometimes"),
        C2dMessage(b"", properties={"$.mid": "spoofed message id"}),
        C2dMessage(b"", properties={"iothub-ack": "full"}),
        C2dMessage(b"", properties={"": "no name"}),
        C2dMessage(b"", expiry=START.replace(tzinfo=None)),
    ],
    ids=[
        "id-129", "id-empty", "id-space", "id-non-ascii", "ack", "system-name", "ack-name", "no-name", "naive"
    ],
)
async def test_malformed_messages_are_refused_as_argument_errors(service, message):
    error = await refused(service, "d1", message)
    assert error.condition == "com.microsoft:argument-error"
    assert depth(service, "d1") == 0


async def test_the_device_gets_ids_properties_and_content_type_as_the_sdk_parses_them(service):
    await service.send_c2d(
        HUB,
        "d1",
        C2dMessage(
            b'{"cmd": "reboot"}',
            message_id="m-1",
            correlation_id="c/1 & 2",
            user_id="ops",
            expiry=START + timedelta(minutes=5),
            ack="full",
            properties={"line": "A/1&2=3", "empty": "", "ünï": "cöde"},
            content_type="application/json",
            content_encoding="utf-8",
        ),
    )
    channel = Channel()
    service.attach(HUB, "d1", channel)
    [(topic, body, _)] = channel.sent
    assert topic.startswith("devices/d1/messages/devicebound/%24.mid=m-1&")
    assert mqtt_topic_iothub.is_c2d_topic(topic, "d1")
    received = Message(body)
    mqtt_topic_iothub.extract_message_properties_from_topic(topic, received)
    assert (received.message_id, received.correlation_id, received.user_id) == ("m-1", "c/1 & 2", "ops")
    assert (received.content_type, received.content_encoding) == ("application/json", "utf-8")
    assert received.ack == "full"
    assert received.expiry_time_utc == "2026-01-01T00:05:00.0000000Z"
    assert received.custom_properties == {"line": "A/1&2=3", "empty": "", "ünï": "cöde"}
    assert received.data == b'{"cmd": "reboot"}'


async def test_default_ttl_and_the_two_day_ceiling(db, clock):  # noqa: F811
    service = build(db, clock, C2dLimits(default_ttl=60))
    service.registry.create_device(HUB, DeviceSpec("d1", auth_type="sas"))
    await service.send_c2d(HUB, "d1", C2dMessage(b"default ttl"))
    await service.send_c2d(HUB, "d1", C2dMessage(b"five days asked", expiry=START + timedelta(days=5)))
    await service.send_c2d(HUB, "d1", C2dMessage(b"already expired", expiry=START - timedelta(seconds=1)))
    assert depth(service, "d1") == 2
    clock.advance(60)
    assert depth(service, "d1") == 1
    clock.advance(2 * 24 * 3600 - 60.000001)
    first = Channel()
    service.attach(HUB, "d1", first)
    assert first.bodies() == [b"five days asked"]
    service.detach(HUB, "d1", first)
    clock.advance(0.000001)
    second = Channel()
    service.attach(HUB, "d1", second)
    assert second.sent == [] and depth(service, "d1") == 0


async def test_delivered_at_once_to_a_subscribed_device_and_removed_only_by_its_puback(service):
    channel = Channel()
    service.attach(HUB, "d1", channel)
    await service.send_c2d(HUB, "d1", C2dMessage(b"one"))
    await service.send_c2d(HUB, "d1", C2dMessage(b"two"))
    assert channel.bodies() == [b"one", b"two"]
    assert depth(service, "d1") == 2  # sent, not yet acknowledged
    channel.sent[1][2]()
    assert depth(service, "d1") == 1
    service.subscribed(HUB, "d1")  # a later subscription does not send the unacknowledged one twice
    assert channel.bodies() == [b"one", b"two"]


async def test_an_unsubscribed_device_gets_its_queue_when_it_subscribes(service):
    channel = Channel(subscribed=False)
    service.attach(HUB, "d1", channel)
    await service.send_c2d(HUB, "d1", C2dMessage(b"waits"))
    assert channel.sent == []
    channel.subscribed = True
    service.subscribed(HUB, "d1")
    assert channel.bodies() == [b"waits"]


async def test_unacknowledged_messages_go_out_again_in_order_on_the_next_connection(service):
    first = Channel()
    service.attach(HUB, "d1", first)
    for body in (b"a", b"b", b"c"):
        await service.send_c2d(HUB, "d1", C2dMessage(body))
    first.sent[0][2]()  # only "a" acknowledged before the connection ends
    service.detach(HUB, "d1", first)
    await service.send_c2d(HUB, "d1", C2dMessage(b"d"))
    second = Channel()
    service.attach(HUB, "d1", second)
    assert second.bodies() == [b"b", b"c", b"d"]
    second.ack_all()
    assert depth(service, "d1") == 0


async def test_a_message_never_acknowledged_is_dropped_after_max_delivery_count(db, clock):  # noqa: F811
    service = build(db, clock, C2dLimits(max_delivery_count=2))
    service.registry.create_device(HUB, DeviceSpec("d1", auth_type="sas"))
    await service.send_c2d(HUB, "d1", C2dMessage(b"poison"))
    for _ in range(2):
        channel = Channel()
        service.attach(HUB, "d1", channel)
        assert channel.bodies() == [b"poison"]
        service.detach(HUB, "d1", channel)
    await service.send_c2d(HUB, "d1", C2dMessage(b"next"))
    third = Channel()
    service.attach(HUB, "d1", third)
    assert third.bodies() == [b"next"]
    assert depth(service, "d1") == 1


async def test_purge_empties_one_queue_and_counts(service):
    channel = Channel()
    service.attach(HUB, "d1", channel)
    for body in (b"a", b"b", b"c"):
        await service.send_c2d(HUB, "d1", C2dMessage(body))
    await service.send_c2d(HUB, "d2", C2dMessage(b"other"))
    result = service.purge_c2d(HUB, "d1")
    assert result == {"deviceId": "d1", "moduleId": None, "totalMessagesPurged": 3}
    channel.ack_all()  # PUBACKs of purged messages change nothing
    assert (depth(service, "d1"), depth(service, "d2")) == (0, 1)
    assert service.purge_c2d(HUB, "d1")["totalMessagesPurged"] == 0
    with pytest.raises(HubError) as caught:
        service.purge_c2d(HUB, "nobody")
    assert caught.value.number == 404001


async def test_queue_depth_in_device_twin_and_query_and_gone_with_the_device(service):
    await service.send_c2d(HUB, "d1", C2dMessage(b"a"))
    await service.send_c2d(HUB, "d1", C2dMessage(b"b"))
    assert service.get_twin(HUB, "d1")["cloudToDeviceMessageCount"] == 2
    listed = {d["deviceId"]: d["cloudToDeviceMessageCount"] for d in service.list_devices(HUB)}
    assert listed == {"d1": 2, "d2": 0}
    rows = service.query_devices(HUB, "SELECT * FROM devices WHERE cloudToDeviceMessageCount > 1")
    assert [row["deviceId"] for row in rows] == ["d1"]
    service.delete_device(HUB, "d1", None)
    service.registry.create_device(HUB, DeviceSpec("d1", auth_type="sas"))
    assert depth(service, "d1") == 0  # a new device of the same id starts with an empty queue


async def test_the_queue_survives_a_restart(db, clock, service, tmp_path):  # noqa: F811
    await service.send_c2d(HUB, "d1", C2dMessage(b"durable", message_id="m-9", properties={"k": "v"}))
    db.close()
    reopened = Database(tmp_path / "emulator.db")
    try:
        again = build(reopened, clock)
        channel = Channel()
        again.attach(HUB, "d1", channel)
        [(topic, body, _)] = channel.sent
        assert body == b"durable" and "%24.mid=m-9" in topic and topic.endswith("&k=v")
    finally:
        reopened.close()
