"""The per-connection state machine, fed bytes with no sockets: protocol rules and the bad-input
catalogue (each ends the connection with a specific reason and emits nothing for the application)."""

from __future__ import annotations

import pytest

from azure_iot_emulator.mqtt import connection as sm
from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.codec import StreamDecoder, encode

CONNECT = encode(p.Connect("dev-1", clean_session=False, keepalive=60, username="h/dev-1/?api-version=x"))


def replies(conn: sm.ServerConnection) -> list[p.Packet]:
    return StreamDecoder().feed(conn.data_to_send())


def connected() -> sm.ServerConnection:
    conn = sm.ServerConnection()
    [event] = conn.receive(CONNECT)
    assert isinstance(event, sm.ConnectRequested)
    assert event.packet.client_id == "dev-1" and event.packet.clean_session is False
    conn.accept(session_present=True)
    assert replies(conn) == [p.ConnAck(0, True)]
    return conn


def test_connect_then_traffic():
    conn = connected()
    events = conn.receive(
        encode(p.Subscribe(1, (("$iothub/twin/res/#", 1),)))
        + encode(p.Publish("devices/dev-1/messages/events/", b"x", 1, 2))
        + encode(p.PubAck(9))
        + encode(p.PingReq())
    )
    assert [type(e) for e in events] == [sm.SubscribeRequested, sm.PublishReceived, sm.PubAckReceived]
    assert replies(conn) == [p.PingResp()]  # answered by the machine itself
    conn.send(p.PubAck(2))
    assert replies(conn) == [p.PubAck(2)]
    assert conn.receive(encode(p.Disconnect())) == [sm.ClientDisconnected()]
    assert conn.state is sm.State.CLOSED


def test_refused_connect_sends_the_return_code_and_closes():
    conn = sm.ServerConnection()
    conn.receive(CONNECT)
    conn.refuse(p.REFUSED_NOT_AUTHORIZED)
    assert replies(conn) == [p.ConnAck(5)]
    assert conn.state is sm.State.CLOSED
    assert conn.receive(encode(p.PingReq())) == []


@pytest.mark.parametrize(
    ("stream", "reason", "connack"),
    [
        (encode(p.PingReq()), "CONNECT_EXPECTED", None),
        (encode(p.Publish("a", b"", 0)), "CONNECT_EXPECTED", None),
        (encode(p.Connect("c", protocol_level=5)), "BAD_PROTOCOL", p.REFUSED_PROTOCOL_VERSION),
        (encode(p.Connect("c", protocol_level=3, protocol_name="MQIsdp")), "BAD_PROTOCOL", 1),
        (encode(p.Connect("c", protocol_name="HTTP")), "BAD_PROTOCOL", None),
        (encode(p.Connect("", clean_session=False)), "BAD_CLIENT_ID", p.REFUSED_IDENTIFIER),
        (b"\x10\xff\xff\xff\xff\x01", "BAD_REMAINING_LENGTH", None),
        (b"GET / HTTP/1.1\r\n\r\n", "CONNECT_EXPECTED", None),
        (b"\x10\x03\x00\x04M", "TRUNCATED", None),
    ],
)
def test_bad_first_packets(stream, reason, connack):
    conn = sm.ServerConnection()
    events = conn.receive(stream)
    assert events == [sm.ProtocolError(reason, events[0].message)]
    assert conn.state is sm.State.CLOSED
    out = replies(conn)
    assert out == ([p.ConnAck(connack)] if connack is not None else [])


@pytest.mark.parametrize(
    ("packet_bytes", "reason"),
    [
        (encode(p.Publish("devices/dev-1/messages/events/", b"x", 2, 5)), "QOS2_UNSUPPORTED"),
        (encode(p.Publish("devices/+/messages/events/", b"x", 1, 5)), "BAD_TOPIC"),
        (encode(p.Publish("a/#", b"x", 0)), "BAD_TOPIC"),
        (CONNECT, "SECOND_CONNECT"),
        (encode(p.PubRec(3)), "UNEXPECTED_PACKET"),
        (encode(p.PubRel(3)), "UNEXPECTED_PACKET"),
        (encode(p.ConnAck(0)), "UNEXPECTED_PACKET"),
        (encode(p.SubAck(1, (0,))), "UNEXPECTED_PACKET"),
        (b"\x32\x05\x00\x01a\x00\x00", "BAD_PACKET_ID"),
        (b"\x30\x02\x00\x05", "TRUNCATED"),  # topic length runs past the announced body
    ],
)
def test_bad_packets_after_connect_close_without_application_events(packet_bytes, reason):
    conn = connected()
    events = conn.receive(encode(p.Publish("devices/dev-1/messages/events/", b"ok", 0)) + packet_bytes)
    assert isinstance(events[0], sm.PublishReceived)  # what came before is still delivered
    assert isinstance(events[-1], sm.ProtocolError) and events[-1].reason == reason
    assert len(events) == 2
    assert conn.state is sm.State.CLOSED
    with pytest.raises(RuntimeError):
        conn.send(p.PubAck(1))


def test_packet_before_connack_is_a_violation():
    conn = sm.ServerConnection()
    events = conn.receive(CONNECT + encode(p.PingReq()))
    assert isinstance(events[0], sm.ConnectRequested)
    assert events[1].reason == "NOT_CONNECTED"


def test_size_limit_applies_per_connection():
    conn = sm.ServerConnection(max_packet_size=100)
    conn.receive(CONNECT)
    conn.accept()
    conn.data_to_send()
    events = conn.receive(encode(p.Publish("t", b"x" * 200, 0)))
    assert events[-1].reason == "PACKET_TOO_LARGE"


@pytest.mark.parametrize(
    ("topic_filter", "valid"),
    [
        ("a/#", True),
        ("#", True),
        ("a/+/b", True),
        ("a#", False),
        ("a/#/b", False),
        ("a+/b", False),
        ("", False),
    ],
)
def test_topic_filter_validation(topic_filter, valid):
    assert sm.valid_topic_filter(topic_filter) is valid
