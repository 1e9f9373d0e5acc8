"""The plug-in interface between the MQTT core and the services behind it (DPS, each IoT hub).

The core (:class:`azure_iot_emulator.mqtt.broker.Broker`) owns sockets, TLS, the codec, sessions and
the connection rules; an *endpoint* owns the meaning of a connection.  Lifecycle of one connection:

1. TLS handshake (a client certificate is requested, any certificate is accepted at the TLS layer).
2. CONNECT -> the first endpoint whose :meth:`Endpoint.claims` is true for the :class:`ConnectInfo`
   (routing by username) gets :meth:`Endpoint.authenticate`; 0 accepts, anything else is the CONNACK
   return code and the connection is closed.  Nobody claims it -> CONNACK 5.
3. Accepted: a previous connection of the same ``(endpoint.name, client_id)`` is closed, the session
   (subscriptions, unacknowledged QoS 1 publishes) is resumed unless ``clean_session``, CONNACK 0 is
   sent, then :meth:`Endpoint.on_connected` is awaited with the :class:`Link`.
4. SUBSCRIBE: each filter is granted (QoS min(requested, 1)) when :meth:`Endpoint.may_subscribe` is
   true, else 0x80.  Subscriptions of ``clean_session=False`` clients are stored in SQLite and survive
   reconnects and restarts (the device SDK never re-subscribes).
5. PUBLISH from the client: :meth:`Endpoint.on_publish` is awaited *before* the PUBACK is sent
   (durable before acknowledged).  Raising :class:`ProtocolViolation` closes the connection without a
   PUBACK (e.g. a publish to another device's topic); any other exception is logged and also closes it.
   Publishes are handled one at a time per connection, in order.  Do not await a reply from the same
   device inside ``on_publish``: its PUBACK is sent only after you return (schedule replies instead;
   :meth:`Link.publish` itself never waits for the device).
   Optional fast path: an endpoint that defines ``async def on_publish_batch(link, publishes) -> int``
   gets every PUBLISH the core has already received back to back from one connection in one call
   (``publishes``: a list of :class:`azure_iot_emulator.mqtt.packets.Publish`, in arrival order; use
   ``.topic`` and ``.payload``) instead of one :meth:`Endpoint.on_publish` each.  It handles them in
   order and returns how many it handled; the core then acknowledges exactly those (QoS 1 ones, in one
   write) and, if that is fewer than it was given, closes the connection (the endpoint logs why).  Any
   exception closes the connection without acknowledging the batch.  Endpoints without it keep the
   one-at-a-time behaviour above.
   Optional faster path still: ``submit_publishes(link, publishes) -> asyncio.Future | None`` (plain
   method, no coroutine), tried first when the connection is otherwise idle and everything just read
   is a PUBLISH.  It either returns ``None`` (nothing done; the core falls back to the paths above) or
   takes the whole batch and returns a future that completes once all of it is handled (durable); the
   core then acknowledges all of it, or closes the connection without acknowledging if the future
   fails.  Later packets of the connection wait until it completes, so order is kept.
6. QoS 2 PUBLISH, malformed packets, packets over the size limit, a second CONNECT: the core closes the
   connection; the endpoint sees only :meth:`Endpoint.on_closed`.
7. Close (any cause): :meth:`Endpoint.on_closed` is awaited once, after the link is unregistered.

An endpoint may set ``persistent_sessions = False`` (DPS does, as Azure's DPS ignores CleanSession and
never keeps sessions): every connection then gets a fresh, unstored session.

Endpoints reach live connections with ``broker.link_for(endpoint_name, client_id)`` /
``broker.is_connected(endpoint_name, client_id)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cryptography import x509

if TYPE_CHECKING:
    from azure_iot_emulator.mqtt.broker import Link


class ProtocolViolation(Exception):
    """Raised by an endpoint to make the core close the connection (no PUBACK is sent)."""


@dataclass(frozen=True)
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


@runtime_checkable
class Endpoint(Protocol):
    name: str
    """``"dps"`` or the hub host name; client-id uniqueness and sessions are per endpoint."""

    def claims(self, info: ConnectInfo) -> bool: ...

    async def authenticate(self, info: ConnectInfo) -> int: ...

    def may_subscribe(self, link: Link, topic_filter: str) -> bool: ...

    async def on_publish(self, link: Link, topic: str, payload: bytes) -> None: ...

    async def on_connected(self, link: Link) -> None: ...

    async def on_closed(self, link: Link) -> None: ...


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
