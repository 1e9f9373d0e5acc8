"""The MQTT core: routes connections to endpoints, keeps sessions, drives the sans-IO state machine.

Transport-agnostic.  A transport shell (TLS in :mod:`azure_iot_emulator.mqtt.tls`; any other byte
stream works the same way) does three things: once its handshake is done it calls
:meth:`Broker.open_connection` with itself (a :class:`Transport`: ``write(bytes)``, ``close()``) and
what it knows of the peer; it hands every plaintext chunk it reads to the returned driver's
:meth:`ConnectionDriver.data_received`; it calls :meth:`ConnectionDriver.connection_lost` once when
the stream is gone (also after the core itself asked it to ``close()``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cryptography import x509

from azure_iot_emulator.mqtt import connection as sm
from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.endpoint import (
    Endpoint,
    ForgetsCredentials,
    LinkObserver,
    ProtocolViolation,
    SubscriptionObserver,
)
from azure_iot_emulator.mqtt.link import ConnectInfo, Link, Session
from azure_iot_emulator.store import Database

log = logging.getLogger(__name__)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS mqtt_subscriptions (
        endpoint TEXT NOT NULL,
        client_id TEXT NOT NULL,
        topic_filter TEXT NOT NULL,
        qos INTEGER NOT NULL,
        PRIMARY KEY (endpoint, client_id, topic_filter)
    )""",
)

CLOSE_TIMEOUT = 2.0  # graceful stop: per phase (drain handlers, flush transports)


class Transport(Protocol):
    """The byte stream under one connection, as the core sees it."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class ConnectionCounter(Protocol):
    """Told of every connection opened (returns a token) and closed (with that token):
    :class:`azure_iot_emulator.longlived.LongLivedObjects`."""

    def opened(self) -> int: ...

    def closed(self, token: int) -> None: ...


class Broker:
    def __init__(
        self,
        db: Database,
        endpoints: Sequence[Endpoint] = (),
        *,
        max_packet_size: int = 512 * 1024,
        connect_timeout: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
        counter: ConnectionCounter | None = None,
    ) -> None:
        self._db = db
        db.register_schema(*SCHEMA)
        self.endpoints: list[Endpoint] = list(endpoints)
        self.max_packet_size = max_packet_size
        self.connect_timeout = connect_timeout
        self._monotonic = monotonic
        self._links: dict[tuple[str, str], Link] = {}
        self._sessions: dict[tuple[str, str], Session] = {}
        self._drivers: set[ConnectionDriver] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._counter = counter

    def add_endpoint(self, endpoint: Endpoint) -> None:
        self.endpoints.append(endpoint)

    # ------------------------------------------------------------------------------------ endpoint API
    def link_for(self, endpoint_name: str, client_id: str) -> Link | None:
        return self._links.get((endpoint_name, client_id))

    def is_connected(self, endpoint_name: str, client_id: str) -> bool:
        return (endpoint_name, client_id) in self._links

    @property
    def connection_count(self) -> int:
        return len(self._drivers)

    def links_per_endpoint(self) -> dict[str, int]:
        """How many clients are connected (CONNECT accepted) to each endpoint now."""
        return dict(collections.Counter(name for name, _ in self._links))

    # ----------------------------------------------------------------------------------- transport API
    def open_connection(
        self,
        transport: Transport,
        *,
        peer_certificate: x509.Certificate | None,
        peer_chain: Sequence[x509.Certificate] = (),
        local_address: tuple[str, int] = ("", 0),
        remote_address: tuple[str, int] = ("", 0),
    ) -> ConnectionDriver:
        driver = ConnectionDriver(
            self, transport, peer_certificate, tuple(peer_chain), local_address, remote_address
        )
        self._drivers.add(driver)
        if self._counter is not None:
            driver.token = self._counter.opened()
        self._ensure_sweeper()
        return driver

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close connections that never sent CONNECT or went silent past 1.5 x keepalive."""
        while self._drivers:
            await asyncio.sleep(min(5.0, self.connect_timeout))
            now = self._monotonic()
            for driver in list(self._drivers):
                driver.check_timeouts(now)

    async def close(self) -> None:
        """Graceful stop: stop reading, let each connection finish what it already received (so every
        stored publish gets its PUBACK), close, and wait for the transports to flush and go away."""
        drivers = list(self._drivers)
        for driver in drivers:
            driver.stop_reading()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(d.drained() for d in drivers)), CLOSE_TIMEOUT)
        for driver in drivers:
            driver.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(d.transport_gone() for d in drivers)), CLOSE_TIMEOUT)

    # ------------------------------------------------------------------------------------ internals
    def _session(self, endpoint: Endpoint, client_id: str, clean: bool) -> tuple[Session, bool]:
        key = (endpoint.name, client_id)
        if clean:
            self._sessions.pop(key, None)
            with self._db.transaction() as conn:
                conn.execute(
                    "DELETE FROM mqtt_subscriptions WHERE endpoint = ? AND client_id = ?", key
                )
            return Session(endpoint.name, client_id, persistent=False), False
        session = self._sessions.get(key)
        if session is None:
            rows = self._db.query(
                "SELECT topic_filter, qos FROM mqtt_subscriptions WHERE endpoint = ? AND client_id = ?", key
            )
            session = Session(endpoint.name, client_id, True, {r["topic_filter"]: r["qos"] for r in rows})
            self._sessions[key] = session
            return session, bool(rows)
        return session, True

    def _store_subscriptions(self, session: Session, added: dict[str, int], removed: Sequence[str]) -> None:
        if not session.persistent:
            return
        with self._db.transaction() as conn:
            for topic_filter, qos in added.items():
                conn.execute(
                    "INSERT OR REPLACE INTO mqtt_subscriptions VALUES (?, ?, ?, ?)",
                    (session.endpoint, session.client_id, topic_filter, qos),
                )
            for topic_filter in removed:
                conn.execute(
                    "DELETE FROM mqtt_subscriptions"
                    " WHERE endpoint = ? AND client_id = ? AND topic_filter = ?",
                    (session.endpoint, session.client_id, topic_filter),
                )

    def _register(self, link: Link) -> None:
        key = (link.endpoint_name, link.client_id)
        old = self._links.get(key)
        if old is not None:
            log.info("%s/%s: new connection replaces the old one", *key)
            old.close()
        self._links[key] = link

    def _unregister(self, link: Link) -> None:
        key = (link.endpoint_name, link.client_id)
        if self._links.get(key) is link:
            del self._links[key]
            if not link.session.persistent:
                self._sessions.pop(key, None)

    def _forget(self, driver: ConnectionDriver) -> None:
        if driver in self._drivers:
            self._drivers.discard(driver)
            if self._counter is not None:
                self._counter.closed(driver.token)


class ConnectionDriver:
    """Runs one connection: feeds the bytes its transport read to the state machine and takes the
    resulting events in order.  Every PUBLISH read back to back goes to the endpoint as one batch,
    at once, even while earlier batches are pending (the endpoint keeps their order; the PUBACKs
    leave in arrival order, each once its batch is done).  Anything else waits until no batch is
    pending; a CONNECT (authentication) holds everything after it until it is done.

    The transport's side is two calls: :meth:`data_received` with plaintext bytes, and
    :meth:`connection_lost` once, when the connection is gone."""

    # One per connection, thousands alive at once: no per-instance dict.
    __slots__ = (
        "_batches", "_broker", "_chain", "_closed", "_conn", "_connecting", "_endpoint", "_events", "_gone",
        "_held", "_keepalive", "_last_rx", "_local", "_lost", "_opened", "_peer", "_reading", "_remote",
        "_transport", "link", "token",
    )  # fmt: skip

    def __init__(
        self,
        broker: Broker,
        transport: Transport,
        peer_certificate: x509.Certificate | None,
        peer_chain: tuple[x509.Certificate, ...],
        local_address: tuple[str, int],
        remote_address: tuple[str, int],
    ) -> None:
        self._broker = broker
        self._transport = transport
        self._peer = peer_certificate
        self._chain = peer_chain
        self._local = local_address
        self._remote = remote_address
        self._conn = sm.ServerConnection(broker.max_packet_size)
        # Lists, not deques: an idle connection's empty list holds no storage (a deque keeps a 528-byte
        # block even when empty, and thousands of connections are idle at any time).  Both are consumed
        # from the head by an index and trimmed once per pass.
        self._events: list[sm.Event] = []
        self._connecting: asyncio.Task[None] | None = None
        self._batches: list[tuple[asyncio.Future[Any], list[p.Publish]]] = []
        self._held: list[p.Packet] | None = None  # what the link sends while batches are pending
        self._endpoint: Endpoint | None = None
        self.link: Link | None = None
        self._closed = False
        self._keepalive = 0
        self._opened = broker._monotonic()
        self._last_rx = self._opened
        self._reading = True
        self._lost = False
        self._gone: asyncio.Future[None] | None = None  # made only when someone waits for the loss
        self.token = 0  # the broker's counter's, for when this connection is gone

    # --------------------------------------------------------------------------------- transport side
    def data_received(self, data: bytes) -> None:
        if self._closed or not self._reading:
            return
        self._last_rx = self._broker._monotonic()
        events = self._conn.receive(data)
        self._flush()
        if events:
            self._events.extend(events)
            if self._connecting is None:
                self._advance()

    def connection_lost(self) -> None:
        self._lost = True
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        if self._closed and self.link is None:
            return
        self._closed = True
        self._conn.close()
        self._events.clear()
        self._finish()

    # ------------------------------------------------------------------------------------ broker side
    def stop_reading(self) -> None:
        self._reading = False

    async def drained(self) -> None:
        """Returns once everything already read is handled."""
        while True:
            pending: set[asyncio.Future[Any]] = {future for future, _ in self._batches}
            if self._connecting is not None:
                pending.add(self._connecting)
            if not pending:
                return
            await asyncio.wait(pending)

    async def transport_gone(self) -> None:
        if self._lost:
            return
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_future()
        await self._gone

    def check_timeouts(self, now: float) -> None:
        if self._closed:
            return
        if self._conn.state in (sm.State.AWAIT_CONNECT, sm.State.AUTHENTICATING):
            if now - self._opened > self._broker.connect_timeout:
                log.info("connection from %s: no CONNECT in time", self._remote)
                self.close()
        elif self._keepalive and now - self._last_rx > 1.5 * self._keepalive:
            log.info("%s: keepalive expired", self._who())
            self.close()

    # -------------------------------------------------------------------------------------- link side
    def send(self, packet: p.Packet) -> None:
        """Send now, or, while publishes are being handled, right after the next PUBACKs (so a reply
        never overtakes the acknowledgement of its request)."""
        if self._closed or self._conn.state is not sm.State.CONNECTED:
            raise ConnectionError("connection closed")
        if self._held is not None:
            self._held.append(packet)
            return
        self._conn.send(packet)
        self._flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._conn.close()
        self._events.clear()
        self._flush()
        self._transport.close()
        self._finish()

    # -------------------------------------------------------------------------------------- the steps
    def _advance(self) -> None:
        """Take queued events in order until one has to wait or none is left."""
        events = self._events
        taken = 0  # events[:taken] are done with (removed after the loop, in one step)
        while taken < len(events) and self._connecting is None and not self._closed:
            event = events[taken]
            try:
                if isinstance(event, sm.PublishReceived):
                    taken += 1
                    batch = [event.packet]
                    while taken < len(events):
                        following = events[taken]
                        if not isinstance(following, sm.PublishReceived):
                            break
                        taken += 1
                        batch.append(following.packet)
                    self._submit(batch)
                elif self._batches:
                    break  # resumed by _batch_done once no batch is pending
                elif isinstance(event, sm.ConnectRequested):
                    taken += 1
                    self._connecting = asyncio.get_running_loop().create_task(self._on_connect(event.packet))
                    self._connecting.add_done_callback(self._connected)
                else:
                    taken += 1
                    self._handle(event)
            except Exception as exc:
                self._fail(exc)
        del events[:taken]  # (a close meanwhile cleared the list: nothing left to remove then)

    def _submit(self, batch: list[p.Publish]) -> None:
        assert self._endpoint is not None and self.link is not None
        after = self._batches[-1][0] if self._batches else None
        future = self._endpoint.submit_publishes(self.link, batch, after)
        self._batches.append((future, batch))
        if self._held is None:
            self._held = []
        future.add_done_callback(self._batch_done)

    def _batch_done(self, _: asyncio.Future[Any]) -> None:
        """Acknowledge, in arrival order, every batch at the head of the queue that is done; then send
        what the link held meanwhile, in the same write."""
        batches = self._batches
        ids: list[int] = []
        failure: BaseException | None = None
        done = 0
        while done < len(batches) and batches[done][0].done():
            future, batch = batches[done]
            done += 1
            failure = ConnectionError("cancelled") if future.cancelled() else future.exception()
            handled = batch if failure is None else batch[: _handled(failure)]
            for publish in handled:
                if publish.packet_id is not None:  # QoS 1
                    ids.append(publish.packet_id)
            if failure is not None:
                break
        del batches[:done]
        if self._closed:
            batches.clear()
            return
        held, self._held = self._held, ([] if batches and failure is None else None)
        if self._conn.state is sm.State.CONNECTED:  # nothing after the client's DISCONNECT
            if ids:
                self._conn.acknowledge(ids)
            if failure is None:
                for packet in held or ():
                    self._conn.send(packet)
            self._flush()
        if failure is not None:
            self._fail(failure)
        elif not batches and self._events:
            self._advance()

    def _connected(self, task: asyncio.Task[None]) -> None:
        self._connecting = None
        failure = ConnectionError("cancelled") if task.cancelled() else task.exception()
        if self._closed:
            return
        if failure is not None:
            self._fail(failure)
        else:
            self._advance()

    def _fail(self, exc: BaseException) -> None:
        """An endpoint error closes this connection only."""
        if isinstance(exc, ProtocolViolation):
            log.info("%s: closing: %s", self._who(), exc)
        else:
            log.error("%s: unexpected error; closing the connection", self._who(), exc_info=exc)
        self.close()

    def _handle(self, event: sm.Event) -> None:
        if isinstance(event, sm.SubscribeRequested):
            self._on_subscribe(event.packet)
        elif isinstance(event, sm.UnsubscribeRequested):
            self._on_unsubscribe(event.packet)
        elif isinstance(event, sm.PubAckReceived):
            if self.link is not None:
                self.link.acknowledged(event.packet_id)
        elif isinstance(event, sm.ClientDisconnected):
            self.close()
        elif isinstance(event, sm.ProtocolError):
            log.info("%s: protocol error %s: %s", self._who(), event.reason, event.message)
            self.close()

    # -------------------------------------------------------------------------------------- internals
    def _who(self) -> str:
        return self.link.client_id if self.link else f"{self._remote[0]}:{self._remote[1]}"

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data:
            self._transport.write(data)

    def _finish(self) -> None:
        link, self.link = self.link, None
        self._broker._forget(self)
        if link is None or link.closed:
            return
        link.closed = True
        self._broker._unregister(link)
        endpoint = self._endpoint
        if isinstance(endpoint, LinkObserver):
            task = asyncio.get_running_loop().create_task(self._notify_closed(endpoint, link))
            _background.add(task)
            task.add_done_callback(_background.discard)

    @staticmethod
    async def _notify_closed(endpoint: LinkObserver, link: Link) -> None:
        try:
            await endpoint.on_closed(link)
        except Exception:
            log.exception("%s: on_closed failed for %s", link.endpoint_name, link.client_id)

    async def _on_connect(self, packet: p.Connect) -> None:
        info = ConnectInfo(
            client_id=packet.client_id,
            username=packet.username,
            password=packet.password,
            clean_session=packet.clean_session,
            keepalive=packet.keepalive,
            peer_certificate=self._peer,
            peer_chain=self._chain,
            local_address=self._local,
            remote_address=self._remote,
        )
        self._peer, self._chain = None, ()  # CONNECT comes once: the info holds them from now on
        endpoint = next((e for e in self._broker.endpoints if e.claims(info)), None)
        if endpoint is None:
            log.info("CONNECT from %s refused: no endpoint for username %r", self._remote, packet.username)
            rc = p.REFUSED_NOT_AUTHORIZED
        else:
            rc = await endpoint.authenticate(info)
        if self._closed:
            return
        if endpoint is None or rc != p.ACCEPTED:
            self._conn.refuse(rc)
            self.close()
            return
        clean = info.clean_session or not endpoint.keeps_sessions
        session, present = self._broker._session(endpoint, info.client_id, clean)
        self._endpoint = endpoint
        self._keepalive = packet.keepalive
        if isinstance(endpoint, ForgetsCredentials) and endpoint.forgets_credentials:
            info = dataclasses.replace(info, password=None, peer_certificate=None, peer_chain=())
        link = Link(self, endpoint.name, info, session)
        self._broker._register(link)
        self.link = link
        self._conn.accept(present)
        self._flush()
        if isinstance(endpoint, LinkObserver):
            await endpoint.on_connected(link)
        for packet_id, (topic, payload) in list(session.inflight.items()):
            if self._closed:
                break
            self.send(p.Publish(topic, payload, 1, packet_id, dup=True))

    def _on_subscribe(self, packet: p.Subscribe) -> None:
        assert self._endpoint is not None and self.link is not None
        codes = []
        granted: dict[str, int] = {}
        for topic_filter, qos in packet.topics:
            if sm.valid_topic_filter(topic_filter) and self._endpoint.may_subscribe(self.link, topic_filter):
                granted[topic_filter] = min(qos, 1)
                codes.append(min(qos, 1))
            else:
                codes.append(p.SUBACK_FAILURE)
        self.link.session.subscriptions.update(granted)
        self._broker._store_subscriptions(self.link.session, granted, ())
        self.send(p.SubAck(packet.packet_id, tuple(codes)))
        if granted and isinstance(self._endpoint, SubscriptionObserver):
            self._endpoint.on_subscribed(self.link, tuple(granted))

    def _on_unsubscribe(self, packet: p.Unsubscribe) -> None:
        assert self.link is not None
        for topic_filter in packet.topics:
            self.link.session.subscriptions.pop(topic_filter, None)
        self._broker._store_subscriptions(self.link.session, {}, packet.topics)
        self.send(p.UnsubAck(packet.packet_id))


def _handled(failure: BaseException) -> int:
    return failure.handled if isinstance(failure, ProtocolViolation) else 0


_background: set[asyncio.Task[None]] = set()
