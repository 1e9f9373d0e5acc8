"""An AMQP 1.0 client made of Qpid Proton's engine (no reactor), for tests that must do what Azure's
clients never do (flood a link, watch its credit, keep deliveries queued): bytes in and out are the test's
to move, over a TLS socket (:func:`exchange`) or straight into a server-side ``AmqpConnection``."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from proton import Connection, Delivery, Message, Receiver, Sender, Transport

from azure_iot_emulator.amqp.nodes import CBS, SAS_TOKEN_TYPE, STATUS_CODE


class AmqpPeer:
    """One client connection (SASL ANONYMOUS, one session)."""

    def __init__(self, hostname: str) -> None:
        self.transport = Transport()
        self.transport.sasl().allowed_mechs("ANONYMOUS")
        self.connection = Connection()
        self.connection.container = "amqp-peer"
        self.connection.hostname = hostname
        self.transport.bind(self.connection)
        self.connection.open()
        self.session = self.connection.session()
        self.session.open()
        self._tags = itertools.count()
        self._cbs_sender: Sender | None = None
        self._cbs_replies: Receiver | None = None

    # ------------------------------------------------------------------------------------------ bytes
    def output(self) -> bytes:
        out = bytearray()
        while (pending := self.transport.pending()) > 0:
            out += self.transport.peek(pending)
            self.transport.pop(pending)
        return bytes(out)

    def feed(self, data: bytes) -> None:
        while data and self.transport.capacity() > 0:
            room = self.transport.capacity()
            self.transport.push(data[:room])
            data = data[room:]

    # ------------------------------------------------------------------------------------------ links
    def sender(self, address: str) -> Sender:
        link = self.session.sender(f"sender-{address}-{next(self._tags)}")
        link.target.address = address
        link.open()
        return link

    def send(self, link: Sender, message: Message) -> Delivery:
        """Queue ``message`` on ``link``; proton transmits it when the link has credit."""
        delivery = link.delivery(str(next(self._tags)).encode())
        link.send(message.encode())
        link.advance()
        return delivery

    def put_token(self, token: str, audience: str) -> Message:
        """Queue a CBS put-token request (opening the $cbs links the first time); :meth:`cbs_answer`."""
        if self._cbs_sender is None:
            self._cbs_sender = self.sender(CBS)
            replies = self.session.receiver("cbs-replies")
            replies.source.address = CBS
            replies.target.address = "cbs-replies"
            replies.open()
            replies.flow(100)
            self._cbs_replies = replies
        request = Message(body=token, reply_to="cbs-replies", id=next(self._tags))
        properties: Any = {"operation": "put-token", "type": SAS_TOKEN_TYPE, "name": audience}
        request.properties = properties
        self.send(self._cbs_sender, request)
        return request

    def cbs_answer(self, request: Message) -> int | None:
        """The status code of the answer to ``request``, once it has arrived (None before)."""
        replies = self._cbs_replies
        assert replies is not None
        while (delivery := replies.current) is not None and delivery.readable and not delivery.partial:
            answer = Message()
            answer.decode(replies.recv(delivery.pending) or b"")
            replies.advance()
            delivery.update(Delivery.ACCEPTED)
            delivery.settle()
            if answer.correlation_id == request.id:
                return int(answer.properties[STATUS_CODE])
        return None


async def exchange(
    peer: AmqpPeer,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    done: Callable[[], object],
    what: str,
    timeout: float = 20.0,
) -> None:
    """Move bytes both ways until ``done()`` is true (it may also wait on the server's side, in this
    process); ``what`` names it when the server closes first or it never comes."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        out = peer.output()
        if out:
            writer.write(out)
            await writer.drain()
        if done():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no {what} within {timeout} s ({done!r})")
        try:
            data = await asyncio.wait_for(reader.read(65536), 0.05)
        except TimeoutError:
            continue
        if not data:
            raise AssertionError(f"the server closed the connection before {what}")
        peer.feed(data)
