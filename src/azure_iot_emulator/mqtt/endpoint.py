"""The plug-in interface between the MQTT core and the services behind it (DPS, each IoT hub).

The core (:class:`azure_iot_emulator.mqtt.broker.Broker`) owns sockets, TLS, the codec, sessions and
the connection rules; an *endpoint* owns the meaning of a connection.  An endpoint is a
:class:`ConnectGate` (who may connect) and a :class:`TrafficHandler` (what a connected client may
subscribe to, what its publishes mean); a :class:`LinkObserver` also hears when its connections open
and close.  Lifecycle of one connection:

1. CONNECT -> the first endpoint whose :meth:`ConnectGate.claims` is true for the :class:`ConnectInfo`
   (routing by username) gets :meth:`ConnectGate.authenticate`; 0 accepts, anything else is the CONNACK
   return code and the connection is closed.  Nobody claims it -> CONNACK 5.
2. Accepted: a previous connection of the same ``(endpoint.name, client_id)`` is closed; the session
   (subscriptions, unacknowledged QoS 1 publishes) is resumed unless ``clean_session`` or the endpoint's
   ``keeps_sessions`` is false; CONNACK; then :meth:`LinkObserver.on_connected`.  The link keeps the
   client's credentials unless the endpoint is a :class:`ForgetsCredentials`.
3. SUBSCRIBE: each filter is granted (QoS min(requested, 1)) when :meth:`TrafficHandler.may_subscribe`
   is true, else 0x80.  Kept sessions store their subscriptions in SQLite (they survive reconnects and
   restarts: the device SDK never re-subscribes).  After the SUBACK, a :class:`SubscriptionObserver`
   hears which filters were granted (to send what waited for them).
4. PUBLISH: see :meth:`TrafficHandler.submit_publishes`.  Any other packet of the connection waits until
   the publishes before it are handled.
5. QoS 2, malformed or oversized packets, a second CONNECT: the core closes the connection.
6. Close (any cause): :meth:`LinkObserver.on_closed`, once, after the link is unregistered.

Endpoints reach live connections with ``broker.link_for(endpoint_name, client_id)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from azure_iot_emulator.mqtt.link import ConnectInfo, Link
from azure_iot_emulator.mqtt.packets import Publish


class ProtocolViolation(Exception):
    """Raised by an endpoint to make the core close the connection.  ``handled``: how many publishes of
    the batch at hand were handled before the violation; the core acknowledges those, no others."""

    def __init__(self, message: str, *, handled: int = 0) -> None:
        super().__init__(message)
        self.handled = handled


class ConnectGate(Protocol):
    name: str
    """``"dps"`` or the hub host name; client-id uniqueness and sessions are per endpoint."""
    keeps_sessions: bool
    """False: every connection gets a fresh, unstored session whatever its CleanSession flag (Azure's
    DPS does that)."""

    def claims(self, info: ConnectInfo) -> bool: ...

    async def authenticate(self, info: ConnectInfo) -> int: ...


class TrafficHandler(Protocol):
    def may_subscribe(self, link: Link, topic_filter: str) -> bool: ...

    def submit_publishes(
        self, link: Link, publishes: Sequence[Publish], after: asyncio.Future[Any] | None
    ) -> asyncio.Future[Any]:
        """Take ``publishes`` (every PUBLISH read back to back from one connection, in arrival order)
        and return at once a future that completes when all of them are handled, durably: the core
        sends their PUBACKs only then, in arrival order, and never after the client's DISCONNECT.
        Fail it with :class:`ProtocolViolation` (``handled`` = how many were handled) to have those
        acknowledged and the connection closed; any other failure closes it acknowledging none.

        ``after`` is the future of this connection's previous batch while that is still pending (the
        core does not wait for it): keep the order, e.g. queue at once where the queue keeps it, or
        start with ``await wait_for_turn(after)``.  What the endpoint publishes to this client
        meanwhile (a reply) leaves right after the next PUBACKs; never wait for the client's answer
        inside.  Coroutine code one publish at a time: return :func:`handle_in_order`."""
        ...


class Endpoint(ConnectGate, TrafficHandler, Protocol):
    """What the core needs from every endpoint."""


@runtime_checkable
class LinkObserver(Protocol):
    """Optional: an endpoint that wants to know its live connections."""

    async def on_connected(self, link: Link) -> None: ...

    async def on_closed(self, link: Link) -> None: ...


@runtime_checkable
class ForgetsCredentials(Protocol):
    """Optional: an endpoint that reads what the client authenticated with (its certificates, its
    password) in :meth:`ConnectGate.authenticate` only.  When ``forgets_credentials`` is true the core
    drops them once the client is accepted: the :class:`Link`'s ``info`` has no ``password``,
    ``peer_certificate`` or ``peer_chain`` (a certificate object is about 1 KiB a connection, for as long
    as the connection lives).  Without it the link keeps them (DPS reads them with every request)."""

    forgets_credentials: bool


@runtime_checkable
class SubscriptionObserver(Protocol):
    """Optional: an endpoint that wants to know when a client's subscriptions were granted."""

    def on_subscribed(self, link: Link, topic_filters: Sequence[str]) -> None:
        """Called after the SUBACK went out, with the filters granted; must not block."""
        ...


async def wait_for_turn(after: asyncio.Future[Any] | None) -> None:
    """Wait until the connection's previous batch is handled; raise if it failed (then the connection
    is closing and nothing after it may be handled)."""
    if after is None:
        return
    if not after.done():
        await asyncio.wait({after})
    if after.cancelled() or after.exception() is not None:
        raise ConnectionError("an earlier publish of this connection failed")


def handle_in_order(
    publishes: Sequence[Publish],
    after: asyncio.Future[Any] | None,
    handle: Callable[[Publish], Awaitable[None]],
) -> asyncio.Future[None]:
    """:meth:`TrafficHandler.submit_publishes` for handlers written one publish at a time: a task that
    waits for ``after``, then awaits ``handle`` for each publish in order, and turns a
    :class:`ProtocolViolation` into one that counts the publishes handled before it."""

    async def run() -> None:
        await wait_for_turn(after)
        for index, packet in enumerate(publishes):
            try:
                await handle(packet)
            except ProtocolViolation as exc:
                raise ProtocolViolation(str(exc), handled=index) from exc

    return asyncio.get_running_loop().create_task(run())
