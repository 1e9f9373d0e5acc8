"""MQTT 3.1.1 packet codec: bytes <-> :mod:`packets` values.  Pure, no I/O.

:func:`encode` serialises any packet (both directions, so tests and benchmark clients reuse it).
:class:`StreamDecoder` takes bytes as they arrive and returns the complete packets; malformed input
raises :class:`MalformedPacket` with a stable ``reason`` and the stream must then be closed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from azure_iot_emulator.mqtt import packets as p

MAX_REMAINING_LENGTH = 268_435_455


class MalformedPacket(Exception):
    """Input that is not valid MQTT 3.1.1; ``reason`` is stable (UPPER_SNAKE_CASE)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------- encode
def _remaining_length(length: int) -> bytes:
    if length < 0 or length > MAX_REMAINING_LENGTH:
        raise ValueError("remaining length out of range")
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return struct.pack("!H", len(data)) + data


def _frame(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + _remaining_length(len(body)) + body


def encode(packet: p.Packet) -> bytes:
    if isinstance(packet, p.Publish):
        flags = (0x08 if packet.dup else 0) | (packet.qos << 1) | (0x01 if packet.retain else 0)
        body = _string(packet.topic)
        if packet.qos:
            if not packet.packet_id:
                raise ValueError("QoS > 0 PUBLISH needs a packet id")
            body += struct.pack("!H", packet.packet_id)
        return _frame(p.PUBLISH, flags, body + packet.payload)
    if isinstance(packet, p.PubAck):
        return _frame(p.PUBACK, 0, struct.pack("!H", packet.packet_id))
    if isinstance(packet, p.PubRec):
        return _frame(p.PUBREC, 0, struct.pack("!H", packet.packet_id))
    if isinstance(packet, p.PubRel):
        return _frame(p.PUBREL, 0x02, struct.pack("!H", packet.packet_id))
    if isinstance(packet, p.PubComp):
        return _frame(p.PUBCOMP, 0, struct.pack("!H", packet.packet_id))
    if isinstance(packet, p.Connect):
        flags = 0x02 if packet.clean_session else 0
        payload = _string(packet.client_id)
        if packet.will_topic is not None:
            flags |= 0x04 | (packet.will_qos << 3) | (0x20 if packet.will_retain else 0)
            payload += _string(packet.will_topic) + _string(packet.will_message or b"")
        if packet.username is not None:
            flags |= 0x80
            payload += _string(packet.username)
        if packet.password is not None:
            flags |= 0x40
            payload += _string(packet.password)
        header = _string(packet.protocol_name) + bytes([packet.protocol_level, flags])
        return _frame(p.CONNECT, 0, header + struct.pack("!H", packet.keepalive) + payload)
    if isinstance(packet, p.ConnAck):
        return _frame(p.CONNACK, 0, bytes([1 if packet.session_present else 0, packet.return_code]))
    if isinstance(packet, p.Subscribe):
        body = struct.pack("!H", packet.packet_id)
        for topic, qos in packet.topics:
            body += _string(topic) + bytes([qos])
        return _frame(p.SUBSCRIBE, 0x02, body)
    if isinstance(packet, p.SubAck):
        return _frame(p.SUBACK, 0, struct.pack("!H", packet.packet_id) + bytes(packet.return_codes))
    if isinstance(packet, p.Unsubscribe):
        body = struct.pack("!H", packet.packet_id) + b"".join(_string(t) for t in packet.topics)
        return _frame(p.UNSUBSCRIBE, 0x02, body)
    if isinstance(packet, p.UnsubAck):
        return _frame(p.UNSUBACK, 0, struct.pack("!H", packet.packet_id))
    if isinstance(packet, p.PingReq):
        return _frame(p.PINGREQ, 0, b"")
    if isinstance(packet, p.PingResp):
        return _frame(p.PINGRESP, 0, b"")
    if isinstance(packet, p.Disconnect):
        return _frame(p.DISCONNECT, 0, b"")
    raise TypeError(f"not an MQTT packet: {packet!r}")


# ----------------------------------------------------------------------------------------------- decode
class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedPacket("TRUNCATED", "packet body ends early")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        raw = self.binary()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacket("BAD_UTF8", "string is not UTF-8") from exc
        if "\x00" in value:
            raise MalformedPacket("BAD_UTF8", "string contains U+0000")
        return value

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def done(self) -> bool:
        return self.pos == len(self.data)


_FIXED_FLAGS = {
    p.CONNECT: 0, p.CONNACK: 0, p.PUBACK: 0, p.PUBREC: 0, p.PUBREL: 2, p.PUBCOMP: 0, p.SUBSCRIBE: 2,
    p.SUBACK: 0, p.UNSUBSCRIBE: 2, p.UNSUBACK: 0, p.PINGREQ: 0, p.PINGRESP: 0, p.DISCONNECT: 0,
}

# Packets that are a packet id only, and packets with no body at all.
_ACKS: dict[int, Callable[[int], p.Packet]] = {
    p.PUBACK: p.PubAck, p.PUBREC: p.PubRec, p.PUBREL: p.PubRel, p.PUBCOMP: p.PubComp, p.UNSUBACK: p.UnsubAck,
}
_EMPTY: dict[int, Callable[[], p.Packet]] = {
    p.PINGREQ: p.PingReq, p.PINGRESP: p.PingResp, p.DISCONNECT: p.Disconnect,
}


def decode_packet(first: int, body: bytes) -> p.Packet:
    """Decode one packet from its first byte and its body (remaining-length bytes)."""
    kind, flags = first >> 4, first & 0x0F
    if kind == 0 or kind == 15:
        raise MalformedPacket("BAD_PACKET_TYPE", f"reserved packet type {kind}")
    if kind != p.PUBLISH and flags != _FIXED_FLAGS[kind]:
        raise MalformedPacket("BAD_FLAGS", f"invalid fixed-header flags for packet type {kind}")
    r = _Reader(body)
    packet: p.Packet
    if kind == p.PUBLISH:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise MalformedPacket("BAD_QOS", "PUBLISH with QoS 3")
        topic = r.text()
        packet_id = None
        if qos:
            packet_id = r.u16()
            if packet_id == 0:
                raise MalformedPacket("BAD_PACKET_ID", "packet id 0")
        return p.Publish(topic, r.rest(), qos, packet_id, bool(flags & 0x01), bool(flags & 0x08))
    if kind in (p.PUBACK, p.PUBREC, p.PUBREL, p.PUBCOMP, p.UNSUBACK):
        pid = r.u16()
        packet = _ACKS[kind](pid)
    elif kind == p.CONNECT:
        packet = _decode_connect(r)
    elif kind == p.CONNACK:
        ack_flags, rc = r.u8(), r.u8()
        if ack_flags & 0xFE:
            raise MalformedPacket("BAD_FLAGS", "reserved CONNACK flags set")
        packet = p.ConnAck(rc, bool(ack_flags & 1))
    elif kind == p.SUBSCRIBE:
        pid = r.u16()
        topics = []
        while not r.done():
            topic = r.text()
            qos = r.u8()
            if qos & 0xFC or qos == 3:
                raise MalformedPacket("BAD_QOS", "SUBSCRIBE requested QoS invalid")
            topics.append((topic, qos))
        if not topics:
            raise MalformedPacket("EMPTY_SUBSCRIBE", "SUBSCRIBE without topic filters")
        packet = p.Subscribe(pid, tuple(topics))
    elif kind == p.SUBACK:
        pid = r.u16()
        packet = p.SubAck(pid, tuple(r.rest()))
    elif kind == p.UNSUBSCRIBE:
        pid = r.u16()
        topics_u = []
        while not r.done():
            topics_u.append(r.text())
        if not topics_u:
            raise MalformedPacket("EMPTY_UNSUBSCRIBE", "UNSUBSCRIBE without topic filters")
        packet = p.Unsubscribe(pid, tuple(topics_u))
    else:
        packet = _EMPTY[kind]()
    if not r.done():
        raise MalformedPacket("TRAILING_BYTES", "packet has bytes beyond its content")
    return packet


def _decode_publish(first: int, buf: bytearray, start: int, end: int) -> p.Publish:
    """PUBLISH straight from the stream buffer (``buf[start:end]`` is its body); the same checks and
    reasons as :func:`decode_packet`."""
    flags = first & 0x0F
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("BAD_QOS", "PUBLISH with QoS 3")
    if start + 2 > end:
        raise MalformedPacket("TRUNCATED", "packet body ends early")
    topic_end = start + 2 + ((buf[start] << 8) | buf[start + 1])
    if topic_end > end:
        raise MalformedPacket("TRUNCATED", "packet body ends early")
    try:
        topic = buf[start + 2 : topic_end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPacket("BAD_UTF8", "string is not UTF-8") from exc
    if "\x00" in topic:
        raise MalformedPacket("BAD_UTF8", "string contains U+0000")
    packet_id = None
    if qos:
        if topic_end + 2 > end:
            raise MalformedPacket("TRUNCATED", "packet body ends early")
        packet_id = (buf[topic_end] << 8) | buf[topic_end + 1]
        if packet_id == 0:
            raise MalformedPacket("BAD_PACKET_ID", "packet id 0")
        topic_end += 2
    return p.Publish(topic, bytes(buf[topic_end:end]), qos, packet_id, bool(flags & 0x01), bool(flags & 0x08))


def _decode_connect(r: _Reader) -> p.Connect:
    name = r.text()
    level = r.u8()
    flags = r.u8()
    if flags & 0x01:
        raise MalformedPacket("BAD_FLAGS", "reserved CONNECT flag set")
    keepalive = r.u16()
    client_id = r.text()
    will_topic = will_message = None
    will_qos = (flags >> 3) & 0x03
    if flags & 0x04:
        if will_qos == 3:
            raise MalformedPacket("BAD_QOS", "will QoS 3")
        will_topic = r.text()
        will_message = r.binary()
    elif will_qos or flags & 0x20:
        raise MalformedPacket("BAD_FLAGS", "will QoS/retain without will flag")
    username = r.text() if flags & 0x80 else None
    if flags & 0x40 and not flags & 0x80:
        raise MalformedPacket("BAD_FLAGS", "password without username")
    password = r.binary() if flags & 0x40 else None
    return p.Connect(
        client_id, bool(flags & 0x02), keepalive, username, password, will_topic, will_message, will_qos,
        bool(flags & 0x20), name, level,
    )


class StreamDecoder:
    """Reassembles packets from a byte stream.  ``max_packet_size`` bounds the whole packet (fixed
    header included); a larger announced length raises ``MalformedPacket("PACKET_TOO_LARGE")`` before
    the body is buffered."""

    __slots__ = ("_buffer", "max_packet_size")  # one per connection: no per-instance dict

    def __init__(self, max_packet_size: int = 512 * 1024) -> None:
        self.max_packet_size = max_packet_size
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[p.Packet]:
        """Add bytes and return every complete packet (raises on the first malformed one)."""
        self.append(data)
        out: list[p.Packet] = []
        while (packet := self.next_packet()) is not None:
            out.append(packet)
        return out

    def append(self, data: bytes) -> None:
        self._buffer += data

    def next_packet(self) -> p.Packet | None:
        """The next complete packet, or None until more bytes arrive."""
        if not self._buffer:  # the usual end of a read: every packet taken
            return None
        header = self._header()
        if header is None:
            return None
        first, header_len, length = header
        total = header_len + length
        if len(self._buffer) < total:
            return None
        buf = self._buffer
        try:
            if first >> 4 == p.PUBLISH:  # the hot path: no intermediate body copy, no reader object
                return _decode_publish(first, buf, header_len, total)
            return decode_packet(first, bytes(buf[header_len:total]))
        finally:
            del buf[:total]

    def _header(self) -> tuple[int, int, int] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        length, multiplier = 0, 1
        for i in range(1, 5):
            if i >= len(buf):
                return None
            byte = buf[i]
            length += (byte & 0x7F) * multiplier
            if not byte & 0x80:
                if i > 1 and byte == 0:
                    raise MalformedPacket("BAD_REMAINING_LENGTH", "non-minimal remaining length")
                if length + i + 1 > self.max_packet_size:
                    raise MalformedPacket("PACKET_TOO_LARGE", f"packet of {length + i + 1} bytes over limit")
                return buf[0], i + 1, length
            multiplier *= 128
        raise MalformedPacket("BAD_REMAINING_LENGTH", "remaining length longer than 4 bytes")
