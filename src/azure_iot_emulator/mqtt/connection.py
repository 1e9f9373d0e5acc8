"""Per-connection MQTT 3.1.1 server state machine, sans-IO.

Bytes go in with :meth:`ServerConnection.receive`, which returns *events* (what the application must
decide or act on); the application answers with methods (:meth:`accept`, :meth:`refuse`,
:meth:`send`) and the bytes to write are taken with :meth:`data_to_send`.  Protocol rules that need no
application decision are enforced here: CONNECT first and once, protocol name/level, QoS 2 refused by
closing (as Azure does), wildcards in PUBLISH topics, PINGREQ answered, size limits.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.codec import MalformedPacket, StreamDecoder, encode

_PUBACK = struct.Struct("!BBH")


class State(enum.Enum):
    AWAIT_CONNECT = "await-connect"
    AUTHENTICATING = "authenticating"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True)
class ConnectRequested:
    packet: p.Connect


@dataclass(frozen=True)
class PublishReceived:
    packet: p.Publish


@dataclass(frozen=True)
class SubscribeRequested:
    packet: p.Subscribe


@dataclass(frozen=True)
class UnsubscribeRequested:
    packet: p.Unsubscribe


@dataclass(frozen=True)
class PubAckReceived:
    packet_id: int


@dataclass(frozen=True)
class ClientDisconnected:
    pass


@dataclass(frozen=True)
class ProtocolError:
    """The connection must be closed (after flushing :meth:`ServerConnection.data_to_send`)."""

    reason: str
    message: str


Event = (
    ConnectRequested | PublishReceived | SubscribeRequested | UnsubscribeRequested | PubAckReceived
    | ClientDisconnected | ProtocolError
)


def valid_topic_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


class ServerConnection:
    __slots__ = ("_decoder", "_out", "state")  # one per connection: no per-instance dict

    def __init__(self, max_packet_size: int = 512 * 1024) -> None:
        self.state = State.AWAIT_CONNECT
        self._decoder = StreamDecoder(max_packet_size)
        self._out = bytearray()

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # ----------------------------------------------------------------------------------------- inbound
    def receive(self, data: bytes) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        if self.state is State.AWAIT_CONNECT and not self._decoder.pending and data and data[0] != 0x10:
            # Not even the first byte of a CONNECT: refuse before buffering anything (e.g. HTTP, TLS).
            return [self._fail(ProtocolError("CONNECT_EXPECTED", "first packet is not CONNECT"))]
        self._decoder.append(data)
        events: list[Event] = []
        while not self.closed:  # (a method, not a narrowed attribute: handling a packet may close)
            try:
                packet = self._decoder.next_packet()
            except MalformedPacket as exc:
                events.append(self._fail(ProtocolError(exc.reason, str(exc))))
                break
            if packet is None:
                break
            event = self._handle(packet)
            if event is not None:
                events.append(event)
        return events

    def _fail(self, error: ProtocolError) -> ProtocolError:
        self.state = State.CLOSED
        return error

    def _handle(self, packet: p.Packet) -> Event | None:
        if self.state is State.AWAIT_CONNECT:
            if not isinstance(packet, p.Connect):
                return self._fail(ProtocolError("CONNECT_EXPECTED", "first packet is not CONNECT"))
            if packet.protocol_name != p.PROTOCOL_NAME or packet.protocol_level != p.PROTOCOL_LEVEL:
                if packet.protocol_name in ("MQTT", "MQIsdp"):
                    self._out += encode(p.ConnAck(p.REFUSED_PROTOCOL_VERSION))
                return self._fail(ProtocolError("BAD_PROTOCOL", "protocol name or level is not MQTT 3.1.1"))
            if not packet.client_id and not packet.clean_session:
                self._out += encode(p.ConnAck(p.REFUSED_IDENTIFIER))
                return self._fail(ProtocolError("BAD_CLIENT_ID", "empty client id with clean_session=0"))
            self.state = State.AUTHENTICATING
            return ConnectRequested(packet)
        if self.state is State.AUTHENTICATING:
            return self._fail(ProtocolError("NOT_CONNECTED", "packet before CONNACK"))
        # CONNECTED
        if isinstance(packet, p.Publish):
            if packet.qos == 2:
                return self._fail(ProtocolError("QOS2_UNSUPPORTED", "QoS 2 PUBLISH is not supported"))
            topic = packet.topic
            if not topic or "+" in topic or "#" in topic:
                return self._fail(ProtocolError("BAD_TOPIC", "PUBLISH topic is empty or has wildcards"))
            return PublishReceived(packet)
        if isinstance(packet, p.PubAck):
            return PubAckReceived(packet.packet_id)
        if isinstance(packet, p.Subscribe):
            return SubscribeRequested(packet)
        if isinstance(packet, p.Unsubscribe):
            return UnsubscribeRequested(packet)
        if isinstance(packet, p.PingReq):
            self._out += encode(p.PingResp())
            return None
        if isinstance(packet, p.Disconnect):
            self.state = State.CLOSED
            return ClientDisconnected()
        if isinstance(packet, p.Connect):
            return self._fail(ProtocolError("SECOND_CONNECT", "CONNECT sent twice"))
        what = type(packet).__name__
        return self._fail(ProtocolError("UNEXPECTED_PACKET", f"{what} not allowed from a client"))

    # ---------------------------------------------------------------------------------------- outbound
    def accept(self, session_present: bool = False) -> None:
        if self.state is not State.AUTHENTICATING:
            raise RuntimeError("accept() outside of authentication")
        self._out += encode(p.ConnAck(p.ACCEPTED, session_present))
        self.state = State.CONNECTED

    def refuse(self, return_code: int) -> None:
        if self.state is not State.AUTHENTICATING:
            raise RuntimeError("refuse() outside of authentication")
        self._out += encode(p.ConnAck(return_code))
        self.state = State.CLOSED

    def send(self, packet: p.Packet) -> None:
        if self.state is not State.CONNECTED:
            raise RuntimeError(f"cannot send in state {self.state.value}")
        self._out += encode(packet)

    def acknowledge(self, packet_ids: Iterable[int]) -> None:
        """Queue a PUBACK for each packet id, in order (one buffer, written with the next flush)."""
        if self.state is not State.CONNECTED:
            raise RuntimeError(f"cannot send in state {self.state.value}")
        out = self._out
        for packet_id in packet_ids:
            out += _PUBACK.pack(0x40, 2, packet_id)

    def close(self) -> None:
        self.state = State.CLOSED

    def data_to_send(self) -> bytes:
        if not self._out:  # after nearly every PUBLISH read: nothing to answer until its commit
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data
