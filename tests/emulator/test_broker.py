"""The MQTT core without sockets: a byte-capturing transport and a small endpoint drive the broker.
Sessions across reconnects and restarts, one connection per client id, QoS 1 redelivery, durable-
before-acknowledged publishes, violations and failures that close only their own connection."""

from __future__ import annotations

import asyncio

import pytest

from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.broker import Broker
from azure_iot_emulator.mqtt.codec import StreamDecoder, encode
from azure_iot_emulator.mqtt.endpoint import ProtocolViolation, handle_in_order
from azure_iot_emulator.mqtt.link import ConnectInfo
from azure_iot_emulator.store import Database


class Wire:
    """What the TLS shell would be: collects what the broker writes."""

    def __init__(self) -> None:
        self.decoder = StreamDecoder()
        self.received: list[p.Packet] = []
        self.closed = False
        self.driver = None

    def write(self, data: bytes) -> None:
        self.received += self.decoder.feed(data)

    def close(self) -> None:
        self.closed = True
        if self.driver is not None:  # a real transport reports the loss after flushing
            asyncio.get_running_loop().call_soon(self.driver.connection_lost)


class Recorder:
    name = "test"
    keeps_sessions = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.connected: list[str] = []
        self.closed: list[str] = []
        self.wires: dict[str, Wire] = {}
        self.acks_seen: list[int] = []

    def claims(self, info: ConnectInfo) -> bool:
        return (info.username or "").startswith("test/")

    async def authenticate(self, info: ConnectInfo) -> int:
        return 0 if info.client_id != "intruder" else 5

    def may_subscribe(self, link, topic_filter: str) -> bool:
        return topic_filter.startswith(f"to/{link.client_id}/")

    def submit_publishes(self, link, publishes, after) -> asyncio.Future[None]:
        return handle_in_order(
            publishes, after, lambda packet: self.on_publish(link, packet.topic, packet.payload)
        )

    async def on_publish(self, link, topic: str, payload: bytes) -> None:
        if topic == "forbidden":
            raise ProtocolViolation("forbidden topic")
        if topic == "crash":
            raise RuntimeError("bug")
        if topic == "slow":
            await asyncio.sleep(0.05)
        await asyncio.sleep(0)  # a real write would yield here
        # Durable before acknowledged: record how many PUBACKs the client had when we handled it.
        wire = self.wires[link.client_id]
        self.acks_seen.append(sum(isinstance(x, p.PubAck) for x in wire.received))
        self.published.append((topic, payload))

    async def on_connected(self, link) -> None:
        self.connected.append(link.client_id)

    async def on_closed(self, link) -> None:
        self.closed.append(link.client_id)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def connect(broker: Broker, endpoint: Recorder, client_id: str, clean: bool = False):
    wire = Wire()
    endpoint.wires[client_id] = wire
    driver = broker.open_connection(wire, peer_certificate=None)
    wire.driver = driver
    driver.data_received(encode(p.Connect(client_id, clean, 60, f"test/{client_id}")))
    await settle()
    return driver, wire


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "emulator.db")
    yield database
    database.close()


async def test_subscriptions_survive_reconnects_and_restarts(db):
    endpoint = Recorder()
    broker = Broker(db, [endpoint])
    driver, wire = await connect(broker, endpoint, "dev-1")
    assert wire.received == [p.ConnAck(0, False)]
    driver.data_received(encode(p.Subscribe(1, (("to/dev-1/#", 1), ("to/dev-2/#", 1)))))
    await settle()
    assert wire.received[-1] == p.SubAck(1, (1, 0x80))
    assert broker.link_for("test", "dev-1").is_subscribed("to/dev-1/x")
    driver.connection_lost()
    await settle()
    assert endpoint.closed == ["dev-1"] and not broker.is_connected("test", "dev-1")

    # Reconnect: session present, still subscribed, no re-subscribe needed.
    _, wire = await connect(broker, endpoint, "dev-1")
    assert wire.received == [p.ConnAck(0, True)]
    assert broker.link_for("test", "dev-1").is_subscribed("to/dev-1/a/b")
    await broker.close()

    # A new broker on the same database (an emulator restart).
    restarted = Broker(db, [endpoint])
    _, wire = await connect(restarted, endpoint, "dev-1")
    assert wire.received == [p.ConnAck(0, True)]
    assert restarted.link_for("test", "dev-1").is_subscribed("to/dev-1/z")
    # clean_session=True forgets it.
    _, wire = await connect(restarted, endpoint, "dev-1", clean=True)
    assert wire.received == [p.ConnAck(0, False)]
    assert not restarted.link_for("test", "dev-1").is_subscribed("to/dev-1/z")
    await restarted.close()


async def test_new_connection_with_the_same_client_id_closes_the_old_one(db):
    endpoint = Recorder()
    broker = Broker(db, [endpoint])
    _, first = await connect(broker, endpoint, "dev-1")
    old_link = broker.link_for("test", "dev-1")
    _, second = await connect(broker, endpoint, "dev-1")
    assert first.closed and not second.closed
    assert broker.link_for("test", "dev-1") is not old_link
    assert endpoint.closed == ["dev-1"]
    with pytest.raises(ConnectionError):
        await old_link.publish("to/dev-1/x", b"late")
    await broker.close()


async def test_unacknowledged_qos1_is_redelivered_with_dup_after_reconnect(db):
    endpoint = Recorder()
    broker = Broker(db, [endpoint])
    driver, wire = await connect(broker, endpoint, "dev-1")
    link = broker.link_for("test", "dev-1")
    await link.publish("to/dev-1/a", b"one")
    await link.publish("to/dev-1/b", b"two")
    first, second = wire.received[1:]
    assert first.qos == 1 and not first.dup
    driver.data_received(encode(p.PubAck(first.packet_id)))
    await settle()
    driver.connection_lost()
    await settle()
    _, wire = await connect(broker, endpoint, "dev-1")
    assert wire.received[1:] == [p.Publish("to/dev-1/b", b"two", 1, second.packet_id, dup=True)]
    await broker.close()


async def test_publish_handled_before_puback_and_violations_close_only_their_connection(db):
    endpoint = Recorder()
    broker = Broker(db, [endpoint])
    good, good_wire = await connect(broker, endpoint, "good")
    bad, bad_wire = await connect(broker, endpoint, "bad")
    good.data_received(encode(p.Publish("data", b"1", 1, 5)))
    await settle()
    assert endpoint.published == [("data", b"1")] and good_wire.received[-1] == p.PubAck(5)

    bad.data_received(encode(p.Publish("forbidden", b"x", 1, 6)))
    await settle()
    assert bad_wire.closed and p.PubAck(6) not in bad_wire.received
    crash, crash_wire = await connect(broker, endpoint, "crash")
    crash.data_received(encode(p.Publish("crash", b"x", 1, 7)))
    await settle()
    assert crash_wire.closed and p.PubAck(7) not in crash_wire.received

    qos2, qos2_wire = await connect(broker, endpoint, "qos2")
    qos2.data_received(encode(p.Publish("data", b"x", 2, 8)))
    await settle()
    assert qos2_wire.closed

    good.data_received(encode(p.Publish("data", b"2", 1, 9)))
    await settle()
    assert good_wire.received[-1] == p.PubAck(9) and not good_wire.closed
    assert endpoint.published == [("data", b"1"), ("data", b"2")]
    assert endpoint.acks_seen == [0, 1]  # each PUBACK was sent only after its publish was handled
    await broker.close()


async def test_refusals_and_unclaimed_usernames(db):
    endpoint = Recorder()
    broker = Broker(db, [endpoint])
    _, wire = await connect(broker, endpoint, "intruder")
    assert wire.received == [p.ConnAck(5)] and wire.closed
    wire = Wire()
    driver = broker.open_connection(wire, peer_certificate=None)
    driver.data_received(encode(p.Connect("x", False, 60, "elsewhere/x")))
    await settle()
    assert wire.received == [p.ConnAck(5)] and wire.closed
    assert endpoint.connected == []
    await broker.close()


async def test_keepalive_and_connect_timeouts(db):
    clock = [0.0]
    endpoint = Recorder()
    broker = Broker(db, [endpoint], connect_timeout=10, monotonic=lambda: clock[0])
    silent_wire = Wire()
    silent = broker.open_connection(silent_wire, peer_certificate=None)
    driver, wire = await connect(broker, endpoint, "dev-1")  # keepalive 60
    clock[0] = 11
    silent.check_timeouts(clock[0])
    driver.check_timeouts(clock[0])
    assert silent_wire.closed and not wire.closed
    driver.data_received(encode(p.PingReq()))
    assert wire.received[-1] == p.PingResp()
    clock[0] = 11 + 89
    driver.check_timeouts(clock[0])
    assert not wire.closed
    clock[0] = 11 + 91
    driver.check_timeouts(clock[0])
    assert wire.closed
    await broker.close()


async def test_graceful_close_acknowledges_what_was_already_received(db):
    endpoint = Recorder()
    broker = Broker(db, [endpoint])
    driver, wire = await connect(broker, endpoint, "dev-1")
    driver.data_received(encode(p.Publish("slow", b"stored", 1, 11)))
    await settle()  # the handler is now mid-write
    await broker.close()
    driver.data_received(encode(p.Publish("data", b"too late", 1, 12)))  # after stop: ignored
    assert endpoint.published == [("slow", b"stored")]
    assert wire.received[-1] == p.PubAck(11) and wire.closed


class Watcher(Recorder):
    """An endpoint that also hears granted subscriptions."""

    def __init__(self) -> None:
        super().__init__()
        self.granted: list[tuple[str, tuple[str, ...], int]] = []

    def on_subscribed(self, link, topic_filters) -> None:
        suback_sent = sum(isinstance(x, p.SubAck) for x in self.wires[link.client_id].received)
        self.granted.append((link.client_id, tuple(topic_filters), suback_sent))


async def test_subscription_observer_hears_granted_filters_after_the_suback(db):
    endpoint = Watcher()
    broker = Broker(db, [endpoint])
    driver, _ = await connect(broker, endpoint, "dev-1")
    driver.data_received(encode(p.Subscribe(1, (("to/dev-1/#", 1), ("to/dev-2/#", 1)))))
    driver.data_received(encode(p.Subscribe(2, (("to/dev-2/#", 1),))))
    await settle()
    assert endpoint.granted == [("dev-1", ("to/dev-1/#",), 1)]  # a refused-only SUBSCRIBE is not heard
    await broker.close()


async def test_publish_acked_calls_back_on_its_puback_and_is_not_replayed(db):
    endpoint = Recorder()
    broker = Broker(db, [endpoint])
    driver, wire = await connect(broker, endpoint, "dev-1")
    link = broker.link_for("test", "dev-1")
    acked: list[str] = []
    link.session.inflight[1] = ("kept/in/session", b"s")  # an ordinary QoS 1 publish, already in flight
    link.publish_acked("to/dev-1/a", b"A", lambda: acked.append("a"))
    link.publish_acked("to/dev-1/b", b"B", lambda: acked.append("b"))
    first, second = wire.received[-2:]
    assert (first.topic, first.qos, second.topic) == ("to/dev-1/a", 1, "to/dev-1/b")
    assert len({first.packet_id, second.packet_id, 1}) == 3  # never an id the session has in flight
    driver.data_received(encode(p.PubAck(second.packet_id)))
    driver.data_received(encode(p.PubAck(second.packet_id)))  # a duplicate PUBACK: nothing more
    await settle()
    assert acked == ["b"]
    driver.connection_lost()
    await settle()
    _, wire = await connect(broker, endpoint, "dev-1")
    replayed = [x.topic for x in wire.received if isinstance(x, p.Publish)]
    assert replayed == ["kept/in/session"]  # "a" was never acknowledged, but its owner resends it
    with pytest.raises(ConnectionError):
        link.publish_acked("to/dev-1/c", b"C", lambda: None)  # the old link is closed
    await broker.close()
