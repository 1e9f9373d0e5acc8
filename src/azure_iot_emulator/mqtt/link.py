"""One accepted MQTT connection as endpoints see it (:class:`Link`), what the client said when it connected
(:class:`ConnectInfo`), its session (subscriptions and unacknowledged QoS 1 publishes) and MQTT's topic
filter matching.  The core (:mod:`.broker`) creates links; endpoints (:mod:`.endpoint`) receive them: both
import this module, neither the other for these types.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509

from azure_iot_emulator.mqtt import packets as p

log = logging.getLogger(__name__)

MAX_INFLIGHT = 1000


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    client_id: str
    username: str | None
    password: bytes | None
    clean_session: bool
    keepalive: int
    peer_certificate: x509.Certificate | None
    """The leaf the client presented in the TLS handshake (None when it presented none)."""
    peer_chain: tuple[x509.Certificate, ...] = field(default_factory=tuple)
    """Further certificates the client sent after its leaf."""
    local_address: tuple[str, int] = ("", 0)
    remote_address: tuple[str, int] = ("", 0)


class PacketSink(Protocol):
    """Where a link's packets go: the core's driver of the connection."""

    def send(self, packet: p.Packet) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Session:
    endpoint: str
    client_id: str
    persistent: bool
    subscriptions: dict[str, int] = field(default_factory=dict)
    inflight: collections.OrderedDict[int, tuple[str, bytes]] = field(default_factory=collections.OrderedDict)
    next_id: int = 0

    def new_packet_id(self, taken: Container[int] = ()) -> int:
        """A packet id neither in flight in the session nor in ``taken``."""
        for _ in range(65535):
            self.next_id = self.next_id % 65535 + 1
            if self.next_id not in self.inflight and self.next_id not in taken:
                return self.next_id
        raise RuntimeError("no free packet id")


class Link:
    """The core's handle on one live, accepted connection (given to endpoints)."""

    # One per connected device, like the core's other per-connection objects: no per-instance dict.
    __slots__ = ("_driver", "_on_ack", "client_id", "closed", "endpoint_name", "info", "session")

    def __init__(self, driver: PacketSink, endpoint_name: str, info: ConnectInfo, session: Session):
        self._driver = driver
        self.endpoint_name = endpoint_name
        self.client_id = info.client_id
        self.info = info
        self.session = session
        self.closed = False
        self._on_ack: dict[int, Callable[[], None]] = {}

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Send PUBLISH to the client (QoS 0 or 1).  QoS 1 messages stay in the session until PUBACKed
        and are re-sent (DUP) when the client reconnects with ``clean_session=False``.  Never waits for
        the client: the packet goes to the transport now or, while publishes of this client are being
        handled, right after their PUBACKs.  Raises ``ConnectionError`` if the link is closed."""
        if self.closed:
            raise ConnectionError(f"{self.endpoint_name}/{self.client_id} is not connected")
        qos = 1 if qos else 0
        packet_id = None
        if qos:
            packet_id = self.session.new_packet_id()
            self.session.inflight[packet_id] = (topic, payload)
            while len(self.session.inflight) > MAX_INFLIGHT:
                self.session.inflight.popitem(last=False)
        self._driver.send(p.Publish(topic, payload, qos, packet_id))

    def publish_acked(self, topic: str, payload: bytes, on_ack: Callable[[], None]) -> None:
        """Send a QoS 1 PUBLISH and call ``on_ack`` when the client's PUBACK for it arrives on this
        connection.  Unlike :meth:`publish` it is not kept in the session: if the connection ends first,
        the caller's own (durable) queue sends it again.  Raises ``ConnectionError`` if the link is closed."""
        if self.closed:
            raise ConnectionError(f"{self.endpoint_name}/{self.client_id} is not connected")
        packet_id = self.session.new_packet_id(self._on_ack)
        self._on_ack[packet_id] = on_ack
        self._driver.send(p.Publish(topic, payload, 1, packet_id))

    def acknowledged(self, packet_id: int) -> None:
        """The client's PUBACK for ``packet_id`` (the core calls this)."""
        on_ack = self._on_ack.pop(packet_id, None)
        if on_ack is None:
            self.session.inflight.pop(packet_id, None)
            return
        try:
            on_ack()
        except Exception:
            log.exception("%s/%s: PUBACK handler failed", self.endpoint_name, self.client_id)

    def is_subscribed(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f in self.session.subscriptions)

    def close(self) -> None:
        self._driver.close()


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 filter matching (``+`` one level, ``#`` the rest, ``$`` topics not matched by a
    leading wildcard)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)
