"""One AMQP 1.0 connection: Apache Qpid Proton's protocol engine pumped from the emulator's asyncio loop.

Why the engine and not proton's reactor: the emulator is one asyncio program whose parts (the hub service,
SQLite, the MQTT core) run on one event loop without locks.  Proton's ``Connection``/``Transport``/
``Collector`` are sans-IO -- bytes in, events out, bytes out -- so each connection is driven from the
same TLS shell as MQTT and HTTPS (``mqtt/tls.py``: Python's ssl over memory BIOs), every callback into the
hub runs on the loop, and there is no second thread to hop to and from.  The reactor would own its
sockets and its own thread, and every hub call would cross threads (``call_soon_threadsafe`` one way,
futures the other).

The frames, the codec, sessions, links, flow control and settlement are proton's; this module only moves
bytes (:meth:`AmqpConnection.data_received`, :meth:`AmqpConnection.flush`), runs the SASL exchange
proton's server lacks (``sasl.py``), writes performatives in full as Azure does (``frames.py``), keeps
proton's idle-timeout timer on the loop, and turns the collector's events into calls on a
:class:`ConnectionHandler` (the application: which links may open, what a received message means, when a
sender may send).

Flow control both ways.  A receiving link gets ``receive_credit`` at attach and more only as deliveries
are settled: what the peer has in flight on a link (credit left plus deliveries received and not yet
settled) never exceeds ``receive_credit``, however slowly the handler settles.  Sending: when the TLS
shell finds the peer not reading (``pause_writing``), :attr:`AmqpConnection.writable` turns False and
handlers stop sending; ``resume_writing`` offers every sender with credit to the handler again.

An unexpected exception in a handler ends that connection only: logged with its traceback, the
connection closed with ``amqp:internal-error``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from proton import (
    Collector,
    Condition,
    Connection,
    Delivery,
    Endpoint,
    Event,
    Link,
    Message,
    Receiver,
    Sender,
    Transport,
)

from azure_iot_emulator.amqp.frames import FramePadder
from azure_iot_emulator.amqp.sasl import SaslRefused, SaslServer

log = logging.getLogger(__name__)
_T = TypeVar("_T")

IDLE_TIMEOUT = 240.0  # seconds without a frame from the peer before the connection is dropped (Azure's)
MAX_FRAME_SIZE = 65536
MAX_MESSAGE_SIZE = 1024 * 1024  # the largest message accepted on a receiving link (Event Hubs' limit)


class Writer(Protocol):
    """The TLS shell the connection writes to (``mqtt/tls.TlsProtocol``)."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class LinkRefused(Exception):
    """Raised by :meth:`ConnectionHandler.link_opening` to refuse an attach: the link is answered and
    detached at once with the AMQP error ``condition`` (``amqp:unauthorized-access``, ``amqp:not-found``...),
    which Azure's clients turn into their exceptions."""

    def __init__(self, condition: str, description: str) -> None:
        super().__init__(description)
        self.condition = condition
        self.description = description


class ConnectionHandler(Protocol):
    def link_opening(self, link: Link) -> None:
        """The peer attached ``link`` (``link.remote_source``/``remote_target`` say what to); raise
        :class:`LinkRefused` to refuse it.  A receiving link is given credit by the connection."""

    def message(self, link: Receiver, delivery: Delivery, message: Message) -> None:
        """A complete message arrived on ``link``; settle ``delivery`` (now or later, then call
        :meth:`AmqpConnection.flush`)."""

    def credit(self, link: Sender) -> None:
        """``link`` (opened by :meth:`link_opening`) has credit, and the peer reads: send what is there
        to send while :attr:`AmqpConnection.writable` stays True."""

    def link_closed(self, link: Link) -> None:
        """The peer detached ``link``, or the connection went away."""


HandlerFactory = Callable[["AmqpConnection"], ConnectionHandler]


INTERNAL_ERROR = "amqp:internal-error"


def settle(delivery: Delivery, outcome: int, condition: Condition | None = None) -> None:
    """Settle a received delivery with ``outcome`` (``Delivery.ACCEPTED``/``REJECTED``...); outside an
    event of the connection, call :meth:`AmqpConnection.flush` after (it tops the link's credit up)."""
    if condition is not None:
        delivery.local.condition = condition
    delivery.update(outcome)
    delivery.settle()


class AmqpConnection:
    """The ``Inner`` of the TLS shell for port 5671: bytes in, events to the handler, bytes out."""

    def __init__(
        self,
        writer: Writer,
        handler: HandlerFactory,
        *,
        receive_credit: int = 100,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._writer = writer
        self._sasl = SaslServer()
        self._padder = FramePadder()
        self._receive_credit = receive_credit
        self.connection = Connection()
        self._collector = Collector()
        self.connection.collect(self._collector)
        self.transport = Transport(Transport.SERVER)
        self.transport.max_frame_size = MAX_FRAME_SIZE
        self.transport.idle_timeout = idle_timeout
        self.transport.bind(self.connection)
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._ending = False  # closed on our side: the close frame goes out, then the socket is closed
        self._links: set[Link] = set()
        self.writable = True
        """False while the peer does not read what it is sent (the TLS shell paused): send nothing more."""
        self.handler = handler(self)

    # ------------------------------------------------------------------------------ from the TLS shell
    def data_received(self, data: bytes) -> None:
        if self._closed or self._ending:
            return
        if not self._sasl.done:
            try:
                step = self._sasl.feed(data)
            except SaslRefused as exc:
                log.info("AMQP connection refused at SASL: %s", exc)
                if exc.reply:
                    self._writer.write(exc.reply)
                self._shut()
                return
            if step.reply:
                self._writer.write(step.reply)
            if not step.done:
                return
            data = step.rest
        while data and not self._closed:
            room = self.transport.capacity()
            if room <= 0:
                break  # the transport's input side is closed (the peer closed or it failed)
            self.transport.push(data[:room])
            data = data[room:]
            self.flush()
        self.flush()

    def connection_lost(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for link in list(self._links):
            self._link_gone(link)

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        for link in list(self._links):
            if isinstance(link, Sender) and link.credit > 0 and not self._closed:
                self.guarded(self.handler.credit, link)
        self.flush()

    def guarded(self, call: Callable[[_T], object], arg: _T) -> None:
        """``call(arg)``; an exception it raises ends this connection (``amqp:internal-error``), logged with
        its traceback: one connection's bug never reaches the event loop or the other connections."""
        try:
            call(arg)
        except Exception:
            log.exception("AMQP connection: unexpected error; closing it with %s", INTERNAL_ERROR)
            self._fail()

    # ----------------------------------------------------------------------------------- the engine
    def flush(self) -> None:
        """Run the collector's events through the handler and send what proton has to send.  Call it
        after changing anything (sending, settling) outside an event of this connection."""
        if self._closed:
            return
        while True:
            event = self._collector.peek()
            if event is None:
                break
            try:
                self.guarded(self._dispatch, event)
            finally:
                self._collector.pop()
        for link in self._links:
            if isinstance(link, Receiver):
                self._top_up(link)
        self._write_out()
        if self._ending:
            self._shut()  # the close frame is written (proton's close_tail would replace its condition)
            return
        self._schedule_tick()

    def _write_out(self) -> None:
        while not self._closed:
            pending = self.transport.pending()
            if pending < 0:  # head closed: everything proton will ever write is written
                self._shut()
                return
            if pending == 0:
                return
            out = self.transport.peek(pending)
            if out:
                padded = self._padder.feed(out)
                if padded:
                    self._writer.write(padded)
            self.transport.pop(pending)

    def _schedule_tick(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        deadline = self.transport.tick(loop.time())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline:
            self._timer = loop.call_at(deadline, self.flush)

    def _shut(self) -> None:
        if self._closed:
            return
        self._writer.close()
        self.connection_lost()

    def _fail(self) -> None:
        """Close the connection with ``amqp:internal-error`` once the running flush has written what
        proton has to send; nothing more is read."""
        self._end(INTERNAL_ERROR, "internal error; the connection is closed")

    def _end(self, condition: str | None, description: str) -> None:
        if self._closed or self._ending:
            return
        self._ending = True
        if condition:
            self.connection.condition = Condition(condition, description)
        self.connection.close()

    def close(self, condition: str | None = None, description: str = "") -> None:
        """Close the connection (with an error condition when given), then the socket."""
        self._end(condition, description)
        self.flush()

    # ------------------------------------------------------------------------------------- dispatch
    def _dispatch(self, event: Event) -> None:
        kind = event.type
        if kind == Event.CONNECTION_REMOTE_OPEN:
            if self.connection.state & Endpoint.LOCAL_UNINIT:
                self.connection.open()
        elif kind == Event.SESSION_REMOTE_OPEN:
            session = event.session
            if session is not None and session.state & Endpoint.LOCAL_UNINIT:
                session.open()
        elif kind == Event.LINK_REMOTE_OPEN:
            if event.link is not None:
                self._link_opening(event.link)
        elif kind == Event.LINK_FLOW:
            link = event.link
            if isinstance(link, Sender) and link in self._links and link.credit > 0:
                self.handler.credit(link)
        elif kind == Event.DELIVERY:
            self._delivery(event.delivery)
        elif kind in (Event.LINK_REMOTE_CLOSE, Event.LINK_REMOTE_DETACH):
            link = event.link
            if link is not None:
                self._link_gone(link)
                if kind == Event.LINK_REMOTE_CLOSE:
                    link.close()
                else:
                    link.detach()
        elif kind == Event.SESSION_REMOTE_CLOSE:
            if event.session is not None:
                event.session.close()
        elif kind == Event.CONNECTION_REMOTE_CLOSE:
            self.connection.close()
        elif kind == Event.TRANSPORT_TAIL_CLOSED:
            # Nothing more will be read (the peer closed, or proton refused what it sent, e.g. a frame it
            # cannot decode): write what proton still has for the peer, then close.
            self._write_out()
            self.transport.close_head()
            self._write_out()
        elif kind == Event.TRANSPORT_CLOSED:
            self._write_out()
            self._shut()

    def _link_opening(self, link: Link) -> None:
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        if isinstance(link, Sender):
            # Settle as the receiver asked: Event Hubs' consumers take their events pre-settled.
            link.snd_settle_mode = link.remote_snd_settle_mode
        else:
            link.max_message_size = MAX_MESSAGE_SIZE
        try:
            self.handler.link_opening(link)
        except LinkRefused as exc:
            log.info("AMQP attach refused (%s): %s", exc.condition, exc.description)
            link.open()
            link.condition = Condition(exc.condition, exc.description)
            link.close()
            return
        link.open()
        self._links.add(link)
        if isinstance(link, Receiver):
            link.flow(self._receive_credit)

    def _top_up(self, link: Receiver) -> None:
        """Give credit back for settled deliveries, at least half the window at a time: credit left plus
        deliveries not yet settled stay within ``receive_credit``."""
        room = self._receive_credit - link.credit - link.unsettled
        if room >= self._receive_credit // 2 and link.state & Endpoint.LOCAL_ACTIVE:
            link.flow(room)

    def _link_gone(self, link: Link) -> None:
        if link in self._links:
            self._links.discard(link)
            self.handler.link_closed(link)

    def _delivery(self, delivery: Delivery | None) -> None:
        if delivery is None:
            return
        link = delivery.link
        if isinstance(link, Receiver):
            if not delivery.readable or delivery.partial:
                return
            data = link.recv(delivery.pending)
            link.advance()
            if link not in self._links:
                settle(delivery, Delivery.REJECTED, Condition("amqp:link:detach-forced", "link not open"))
                return
            message = Message()
            try:
                message.decode(data or b"")
            except Exception as exc:  # proton's MessageException / DataException for a malformed message
                settle(
                    delivery, Delivery.REJECTED, Condition("amqp:decode-error", f"malformed message: {exc}")
                )
                return
            self.handler.message(link, delivery, message)
            self._top_up(link)
        elif delivery.updated and not delivery.settled:
            delivery.settle()  # the receiver's disposition of an event: nothing more to do
