"""The MQTT codec: property-based round trips, arbitrary chunking, and the malformed-input catalogue."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.codec import MalformedPacket, StreamDecoder, decode_packet, encode

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
topic = text.filter(lambda t: t and "+" not in t and "#" not in t)
pid = st.integers(1, 65535)

publishes = st.one_of(
    st.builds(p.Publish, topic, st.binary(max_size=300), st.just(0), st.none(), st.booleans(), st.booleans()),
    st.builds(
        p.Publish, topic, st.binary(max_size=300), st.integers(1, 2), pid, st.booleans(), st.booleans()
    ),
)
connects = st.builds(
    p.Connect,
    client_id=text,
    clean_session=st.booleans(),
    keepalive=st.integers(0, 65535),
    username=st.none() | text,
    password=st.none(),
)
connects_with_password = st.builds(p.Connect, client_id=text, username=text, password=st.binary(max_size=50))
packets_st = st.one_of(
    publishes,
    connects,
    connects_with_password,
    st.builds(p.ConnAck, st.integers(0, 5), st.booleans()),
    st.builds(p.PubAck, pid),
    st.builds(p.PubRec, pid),
    st.builds(p.PubRel, pid),
    st.builds(p.PubComp, pid),
    st.builds(
        p.Subscribe,
        pid,
        st.lists(st.tuples(text.filter(bool), st.integers(0, 2)), min_size=1, max_size=4).map(tuple),
    ),
    st.builds(p.SubAck, pid, st.lists(st.sampled_from([0, 1, 2, 0x80]), max_size=4).map(tuple)),
    st.builds(p.Unsubscribe, pid, st.lists(text.filter(bool), min_size=1, max_size=4).map(tuple)),
    st.builds(p.UnsubAck, pid),
    st.just(p.PingReq()),
    st.just(p.PingResp()),
    st.just(p.Disconnect()),
)


@given(st.lists(packets_st, min_size=1, max_size=8), st.data())
@settings(max_examples=200, deadline=None)
def test_round_trip_in_arbitrary_chunks(packets, data):
    stream = b"".join(encode(packet) for packet in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    decoder = StreamDecoder(max_packet_size=1 << 20)
    out = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[last:cut])
        last = cut
    assert out == packets
    assert decoder.pending == 0


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_random_bytes_either_decode_or_raise_malformed(blob):
    decoder = StreamDecoder(max_packet_size=4096)
    try:
        decoder.feed(blob)
    except MalformedPacket as exc:
        assert exc.reason.isupper()


def _frame(first: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([first, len(body)]) + body


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (b"\x30\xff\xff\xff\xff\x01", "BAD_REMAINING_LENGTH"),  # five length bytes
        (b"\x30\x80\x00", "BAD_REMAINING_LENGTH"),  # non-minimal encoding
        (b"\x00\x00", "BAD_PACKET_TYPE"),
        (b"\xf0\x00", "BAD_PACKET_TYPE"),
        (b"\x82\x02\x00\x01", "EMPTY_SUBSCRIBE"),
        (b"\x80\x05\x00\x01\x00\x01a", "BAD_FLAGS"),  # SUBSCRIBE without the mandatory 0b0010 flags
        (b"\x36\x05\x00\x01a\x00\x01", "BAD_QOS"),  # QoS 3
        (b"\x32\x05\x00\x01a\x00\x00", "BAD_PACKET_ID"),  # QoS 1 with packet id 0
        (b"\x30\x03\x00\x05a", "TRUNCATED"),  # topic length beyond the body
        (b"\x30\x04\x00\x02\xff\xfe", "BAD_UTF8"),
        (b"\x40\x03\x00\x01\x00", "TRAILING_BYTES"),  # PUBACK with a third byte
        (_frame(0x10, b"\x00\x04MQTT\x04\x01\x00\x3c\x00\x01c"), "BAD_FLAGS"),  # reserved CONNECT flag
        (_frame(0x10, b"\x00\x04MQTT\x04\x40\x00\x3c\x00\x01c\x00\x01x"), "BAD_FLAGS"),  # password w/o user
    ],
)
def test_malformed_catalogue(stream, reason):
    with pytest.raises(MalformedPacket) as info:
        StreamDecoder().feed(stream)
    assert info.value.reason == reason


def test_oversized_packet_is_refused_from_its_header_alone():
    decoder = StreamDecoder(max_packet_size=1024)
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(b"\x30\x80\x10")  # announces 2048 bytes; nothing of the body has arrived
    assert info.value.reason == "PACKET_TOO_LARGE"


def test_partial_header_waits_for_more():
    decoder = StreamDecoder()
    assert decoder.feed(b"\x30") == []
    assert decoder.feed(b"\x82") == []  # continuation bit set: length not complete yet
    assert decoder.feed(b"\x01") == []  # 130 bytes announced, none arrived
    assert decoder.pending == 3


def test_decode_packet_is_the_inverse_of_encode_for_a_known_frame():
    frame = encode(p.Publish("devices/a/messages/events/", b"{}", 1, 7))
    assert frame[0] == 0x32
    assert decode_packet(frame[0], frame[2:]) == p.Publish("devices/a/messages/events/", b"{}", 1, 7)
