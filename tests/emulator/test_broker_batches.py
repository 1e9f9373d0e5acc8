"""The MQTT core's one publish path without sockets: every PUBLISH read back to back reaches the
endpoint in one ``submit_publishes`` call, at once, with the previous batch's future while that is
pending; a PUBACK leaves only after the endpoint's future says the publish is handled, in arrival order,
never after the client's DISCONNECT; other packets wait for the publishes before them; a failure closes
only that connection, acknowledging exactly what was handled."""

from __future__ import annotations

import asyncio

import pytest
from test_broker import Wire, settle

from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.broker import Broker
from azure_iot_emulator.mqtt.codec import encode
from azure_iot_emulator.mqtt.endpoint import ProtocolViolation, handle_in_order
from azure_iot_emulator.mqtt.link import ConnectInfo
from azure_iot_emulator.store import Database


class Batching:
    """An endpoint without sessions or connection callbacks.  A batch of only ``fast/...`` topics gets a
    future the test completes; ``explode`` makes ``submit_publishes`` itself raise; otherwise each
    publish is handled in order by a task (``bad`` is a violation, ``ask`` is answered at once)."""

    name = "batch"
    keeps_sessions = False

    def __init__(self) -> None:
        self.handled: list[bytes] = []
        self.submitted: list[tuple[list[bytes], asyncio.Future[None]]] = []
        self.calls: list[list[int | None]] = []
        self.afters: list[asyncio.Future[None] | None] = []

    def claims(self, info: ConnectInfo) -> bool:
        return True

    async def authenticate(self, info: ConnectInfo) -> int:
        return 0

    def may_subscribe(self, link, topic_filter: str) -> bool:
        return True

    def submit_publishes(self, link, publishes, after) -> asyncio.Future[None]:
        self.calls.append([packet.packet_id for packet in publishes])
        self.afters.append(after)
        if any(packet.topic == "explode" for packet in publishes):
            raise RuntimeError("endpoint bug")
        if all(packet.topic.startswith("fast/") for packet in publishes):
            future = asyncio.get_running_loop().create_future()
            self.submitted.append(([packet.payload for packet in publishes], future))
            return future
        return handle_in_order(publishes, after, lambda packet: self._handle(link, packet))

    async def _handle(self, link, packet: p.Publish) -> None:
        if packet.topic == "bad":
            raise ProtocolViolation("bad topic")
        if packet.topic == "ask":
            await link.publish("reply", b"answer of " + packet.payload)
        await asyncio.sleep(0)
        self.handled.append(packet.payload)


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "emulator.db")
    yield database
    database.close()


async def open_client(broker: Broker, client_id: str = "dev", clean: bool = False):
    wire = Wire()
    driver = broker.open_connection(wire, peer_certificate=None)
    wire.driver = driver
    driver.data_received(encode(p.Connect(client_id, clean, 60, "batch/" + client_id)))
    await settle()
    assert wire.received == [p.ConnAck(0)]
    return driver, wire


def publishes(*items: tuple[str, int]) -> bytes:
    return b"".join(encode(p.Publish(topic, f"m{pid}".encode(), 1, pid)) for topic, pid in items)


def acks(wire: Wire) -> list[int]:
    return [packet.packet_id for packet in wire.received if isinstance(packet, p.PubAck)]


@pytest.mark.slow
async def test_publishes_are_acknowledged_only_after_completion_in_arrival_order(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    driver.data_received(publishes(("fast/a", 1), ("fast/a", 2)))
    driver.data_received(publishes(("fast/a", 3)))
    await settle()
    # Both handed over at once, the second with the first's future; nothing acknowledged yet.
    (_, first), (_, second) = endpoint.submitted
    assert endpoint.calls == [[1, 2], [3]] and endpoint.afters == [None, first]
    assert acks(wire) == []
    second.set_result(None)  # done first, acknowledged only after the batch before it
    await settle()
    assert acks(wire) == []
    first.set_result(None)
    await settle()
    assert acks(wire) == [1, 2, 3] and not wire.closed
    driver.data_received(publishes(("fast/b", 4)))
    await settle()
    assert endpoint.afters[-1] is None  # nothing pending any more
    await broker.close()


@pytest.mark.parametrize("first_fails", [False, True])
async def test_a_task_waits_for_the_batch_before_it(db, first_fails):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    driver.data_received(publishes(("fast/a", 1)))
    driver.data_received(publishes(("slow", 2)))
    await settle()
    assert endpoint.handled == [] and acks(wire) == []
    first = endpoint.submitted[0][1]
    if first_fails:
        first.set_exception(RuntimeError("not stored"))
    else:
        first.set_result(None)
    await settle()
    if first_fails:  # nothing after a failed batch is handled or acknowledged
        assert wire.closed and endpoint.handled == [] and acks(wire) == []
    else:
        assert endpoint.handled == [b"m2"] and acks(wire) == [1, 2] and not wire.closed
    await broker.close()


@pytest.mark.slow
async def test_packets_after_a_batch_wait_for_it(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    driver.data_received(
        publishes(("fast/a", 1)) + encode(p.Subscribe(7, (("x/#", 1),))) + publishes(("fast/a", 2))
    )
    await settle()
    # The SUBSCRIBE waits for the publish before it, and the publish after it for the SUBSCRIBE.
    assert wire.received == [p.ConnAck(0)] and endpoint.calls == [[1]]
    endpoint.submitted[0][1].set_result(None)
    await settle()
    assert wire.received[1:] == [p.PubAck(1), p.SubAck(7, (1,))] and endpoint.calls == [[1], [2]]
    assert endpoint.afters[-1] is None
    await broker.close()


async def test_a_reply_sent_while_handling_leaves_after_the_puback(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    driver.data_received(publishes(("ask", 1), ("slow", 2)))
    await settle()
    reply = wire.received[-1]
    assert wire.received[1:-1] == [p.PubAck(1), p.PubAck(2)]
    assert isinstance(reply, p.Publish) and (reply.topic, reply.payload) == ("reply", b"answer of m1")
    link = broker.link_for("batch", "dev")
    assert link is not None and list(link.session.inflight) == [reply.packet_id]  # kept until PUBACKed
    await broker.close()


async def test_qos0_publishes_are_handled_but_not_acknowledged(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    driver.data_received(
        encode(p.Publish("slow", b"q0", 0)) + publishes(("slow", 2)) + encode(p.Publish("slow", b"q0b", 0))
    )
    await settle()
    assert endpoint.handled == [b"q0", b"m2", b"q0b"] and acks(wire) == [2]
    await broker.close()


async def test_failed_submission_closes_without_acknowledging(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    other, other_wire = await open_client(broker, "other")
    driver.data_received(publishes(("fast/a", 1)))
    await settle()
    endpoint.submitted[0][1].set_exception(RuntimeError("not stored"))
    await settle()
    assert wire.closed and acks(wire) == []
    other.data_received(publishes(("slow", 5)))
    await settle()
    assert acks(other_wire) == [5] and not other_wire.closed  # only the failing connection closed
    await broker.close()


async def test_endpoint_raising_at_once_closes_that_connection_only(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    other, other_wire = await open_client(broker, "other")
    driver.data_received(publishes(("slow", 1), ("explode", 2)))
    await settle()
    assert wire.closed and acks(wire) == [] and endpoint.handled == []
    other.data_received(publishes(("slow", 3)))
    await settle()
    assert acks(other_wire) == [3] and not other_wire.closed
    await broker.close()


async def test_violation_acknowledges_what_was_handled_then_closes(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker)
    driver.data_received(publishes(("slow", 1), ("fast/a", 2), ("bad", 3), ("slow", 4)))
    await settle()
    assert endpoint.calls == [[1, 2, 3, 4]]  # one call for everything read together
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
    driver.data_received(publishes(("slow", 1)) + encode(p.Disconnect()))  # one read
    await settle()
    assert endpoint.handled == [b"m1"] and wire.closed and acks(wire) == []
    other, other_wire = await open_client(broker, "dev-2")
    other.data_received(publishes(("fast/a", 2)))  # DISCONNECT in a later read, while it is pending
    await settle()
    other.data_received(encode(p.Disconnect()))
    endpoint.submitted[0][1].set_result(None)
    await settle()
    assert other_wire.closed and acks(other_wire) == []  # the client said goodbye: no PUBACK after it
    await broker.close()


async def test_an_endpoint_that_keeps_no_sessions_ignores_clean_session_false(db):
    endpoint = Batching()
    broker = Broker(db, [endpoint])
    driver, wire = await open_client(broker, clean=False)
    driver.data_received(encode(p.Subscribe(1, (("x/#", 1),))))
    await settle()
    link = broker.link_for("batch", "dev")
    assert wire.received[-1] == p.SubAck(1, (1,)) and link is not None and link.is_subscribed("x/y")
    driver.connection_lost()
    await settle()
    await open_client(broker, clean=False)  # asserts CONNACK without session present
    link = broker.link_for("batch", "dev")
    assert link is not None and not link.is_subscribed("x/y")
    await broker.close()
    assert db.query("SELECT * FROM mqtt_subscriptions") == []
