"""The MQTT core's batch paths without sockets: publishes read together reach an endpoint in one call
(``on_publish_batch``) or, on the fastest path, are submitted without a task (``submit_publishes``).
Either way a PUBACK leaves only after the endpoint has handled the publish, in order, and a failure
closes the connection without acknowledging what was not handled."""

from __future__ import annotations

import asyncio

import pytest
from test_broker import Wire, settle

from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.broker import Broker
from azure_iot_emulator.mqtt.codec import encode
from azure_iot_emulator.mqtt.endpoint import ConnectInfo, ProtocolViolation
from azure_iot_emulator.store import Database


class Batching:
    """An endpoint with both batch paths.  Topics: ``fast/...`` may take the submit path (completed
    when the test resolves the future), ``bad`` is a violation, anything else is handled normally."""

    name = "batch"

    def __init__(self) -> None:
        self.handled: list[bytes] = []
        self.submitted: list[tuple[list[bytes], asyncio.Future[None]]] = []
        self.batch_calls: list[int] = []

    def claims(self, info: ConnectInfo) -> bool:
        return True

    async def authenticate(self, info: ConnectInfo) -> int:
        return 0

    def may_subscribe(self, link, topic_filter: str) -> bool:
        return False

    def submit_publishes(self, link, publishes):
        if not all(packet.topic.startswith("fast/") for packet in publishes):
            return None
        future = asyncio.get_running_loop().create_future()
        self.submitted.append(([packet.payload for packet in publishes], future))
        return future

    async def on_publish_batch(self, link, publishes) -> int:
        self.batch_calls.append(len(publishes))
        for index, packet in enumerate(publishes):
            if packet.topic == "bad":
                return index
            await asyncio.sleep(0)
            self.handled.append(packet.payload)
        return len(publishes)

    async def on_publish(self, link, topic: str, payload: bytes) -> None:  # not used: batches win
        raise AssertionError("on_publish called although on_publish_batch exists")

    async def on_connected(self, link) -> None:
        pass

    async def on_closed(self, link) -> None:
        pass


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "emulator.db")
    yield database
    database.close()


async def open_client(broker: Broker, client_id: str = "dev"):
    wire = Wire()
    driver = broker.open_connection(wire, peer_certificate=None)
    wire.driver = driver
    driver.data_received(encode(p.Connect(client_id, False, 60, "batch/" + client_id)))
    await settle()
    assert wire.received == [p.ConnAck(0)]
    return driver, wire


def publishes(*items: tuple[str, int]) -> bytes:
    return b"".join(encode(p.Publish(topic, f"m{pid}".encode(), 1, pid)) for topic, pid in items)


def acks(wire: Wire) -> list[int]:
    return [packet.packet_id for packet in wire.received if isinstance(packet, p.PubAck)]


async def test_submitted_publishes_are_acknowledged_only_after_completion_in_order(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    driver.data_received(publishes(("fast/a", 1), ("fast/a", 2)))
    driver.data_received(publishes(("fast/a", 3)))
    await settle()
    assert [payloads for payloads, _ in endpoint.submitted] == [[b"m1", b"m2"], [b"m3"]]
    assert acks(wire) == []  # nothing acknowledged before the endpoint completes
    # A packet that needs the general path waits for the submitted ones.
    driver.data_received(publishes(("slow", 4)))
    await settle()
    assert endpoint.handled == [] and acks(wire) == []
    endpoint.submitted[0][1].set_result(None)
    await settle()
    assert acks(wire) == [1, 2] and endpoint.handled == []
    endpoint.submitted[1][1].set_result(None)
    await settle()
    assert acks(wire) == [1, 2, 3, 4] and endpoint.handled == [b"m4"]
    assert not wire.closed
    await broker.close()


async def test_failed_submission_closes_without_acknowledging(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    driver.data_received(publishes(("fast/a", 1)))
    await settle()
    endpoint.submitted[0][1].set_exception(ProtocolViolation("not stored"))
    await settle()
    assert wire.closed and acks(wire) == []
    await broker.close()


async def test_batch_handler_acknowledges_what_it_handled_then_closes(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    driver.data_received(publishes(("slow", 1), ("fast/a", 2), ("bad", 3), ("slow", 4)))
    await settle()
    assert endpoint.batch_calls == [4]  # one call for everything read together
    assert endpoint.handled == [b"m1", b"m2"]
    assert acks(wire) == [1, 2] and wire.closed
    await broker.close()


async def test_graceful_close_waits_for_submitted_publishes(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    driver.data_received(publishes(("fast/a", 1)))
    await settle()
    closing = asyncio.get_running_loop().create_task(broker.close())
    await settle()
    assert not closing.done()
    endpoint.submitted[0][1].set_result(None)
    await asyncio.wait_for(closing, 5)
    assert acks(wire) == [1] and wire.closed


async def test_disconnect_after_publishes_stores_them_and_closes(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    driver.data_received(publishes(("slow", 1)) + encode(p.Disconnect()))  # one read: general path
    await settle()
    assert endpoint.handled == [b"m1"] and wire.closed
    other, other_wire = await open_client(broker, "dev-2")
    other.data_received(publishes(("fast/a", 2)))  # fast path, then DISCONNECT in a later read
    await settle()
    other.data_received(encode(p.Disconnect()))
    endpoint.submitted[0][1].set_result(None)
    await settle()
    assert other_wire.closed and acks(other_wire) == []  # the client said goodbye: no PUBACK after it
    await broker.close()
