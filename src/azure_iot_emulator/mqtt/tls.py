"""The thin asyncio + TLS shell: moves bytes between a socket and the MQTT core (or, on the HTTPS
listener, an HTTP server: see ``azure_iot_emulator/https.py``).

TLS is Python's ``ssl`` (``SSLObject`` over memory BIOs) driven by an asyncio Protocol: the server
asks for a certificate, accepts whatever is presented (self-signed or CA-signed: :mod:`.accept_any`
gives ``ssl`` the verify hook it lacks), and the endpoint decides authorisation after the handshake from
the presented leaf.  TLS 1.2 and 1.3.

Back-pressure (:class:`OutputGuard`, one shared by every listener): a peer that sends requests but does
not read the answers would make its socket's write buffer grow without limit.  When a connection's buffer
passes :data:`HIGH_WATER` (the transport calls :meth:`TlsProtocol.pause_writing`), the shell stops
reading from that peer and tells what runs over it (``pause_writing`` of the inner protocol, when it has
one: AMQP stops sending events, HTTP handlers wait in ``drain()``); below :data:`LOW_WATER` it reads
again.  A peer whose buffer stays above the low-water mark for ``stall_timeout`` seconds, or goes past
``max_queued`` bytes meanwhile (what the server sends on its own: C2D, twin updates), is dropped (the
socket aborted, its buffer discarded).  Mosquitto, by contrast, keeps the client and drops messages past
``max_queued_messages``; here every message a device was sent is durable (a C2D message stays queued until
its PUBACK), so dropping the connection loses nothing the device would not get again when it reconnects.
"""

from __future__ import annotations

import _ssl
import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast, runtime_checkable

from cryptography import x509

from azure_iot_emulator.mqtt.accept_any import accept_any_client_certificate
from azure_iot_emulator.mqtt.broker import Broker
from azure_iot_emulator.mqtt.membio import layout_proven, release

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0
_READ_CHUNK = 65536
HIGH_WATER = 256 * 1024  # bytes queued for a peer before the shell stops reading from it
LOW_WATER = 64 * 1024  # ... and resumes once the peer has read that far
DEFAULT_STALL_TIMEOUT = 60.0  # seconds a peer may stay above the low-water mark before it is dropped
MAX_QUEUED = 16 * 1024 * 1024  # bytes queued for a stalled peer past which it is dropped at once


class OutputGuard:
    """The listeners' back-pressure settings and what they did (read by ``/metrics``): the connections
    alive now, the bytes queued for them, how many are stalled (not read from, their peer not reading) and
    how many were dropped for it."""

    def __init__(
        self,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        *,
        high_water: int = HIGH_WATER,
        low_water: int = LOW_WATER,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        if not 0 < low_water < high_water < max_queued or stall_timeout <= 0:
            raise ValueError("need 0 < low_water < high_water < max_queued and a positive stall timeout")
        self.stall_timeout = stall_timeout
        self.high_water = high_water
        self.low_water = low_water
        self.max_queued = max_queued
        self.connections: set[TlsProtocol] = set()
        self.stalled: set[TlsProtocol] = set()
        self.dropped = 0

    def queued_bytes(self) -> int:
        """Bytes written for peers that their sockets have not taken yet, over every connection."""
        return sum(connection.buffered for connection in self.connections)


@runtime_checkable
class FlowControlled(Protocol):
    """An :class:`Inner` that wants to know when its peer stops reading (optional)."""

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """The listeners' TLS: TLS 1.2 and 1.3, a client certificate requested (not required: SAS devices
    and service clients present none) and any accepted.  ``ssl`` already lets OpenSSL free each
    connection's read/write buffers between records (SSL_MODE_RELEASE_BUFFERS), which matters with
    thousands of idle devices; no resumption (no tickets, no session cache, which would pin a session
    with the peer's certificate per device in memory)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)  # checks that the key is the certificate's
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    accept_any_client_certificate(ctx)
    layout_proven()  # once, at start-up: whether the handshakes' BIO buffers can be given back (membio.py)
    return ctx


class Inner(Protocol):
    """What runs over the TLS connection once the handshake is done (the MQTT core's driver, or an
    HTTP server)."""

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self) -> None: ...


@dataclass(frozen=True)
class Peer:
    """What the handshake established about the other end."""

    leaf: x509.Certificate | None
    chain: Sequence[x509.Certificate]
    local: tuple[str, int]
    remote: tuple[str, int]


Opener = Callable[["TlsProtocol", Peer], Inner]


def mqtt_opener(broker: Broker) -> Opener:
    def open_mqtt(tls: TlsProtocol, peer: Peer) -> Inner:
        return broker.open_connection(
            tls,
            peer_certificate=peer.leaf,
            peer_chain=peer.chain,
            local_address=peer.local,
            remote_address=peer.remote,
        )

    return open_mqtt


def peer_certificates(
    ssl_object: ssl.SSLObject,
) -> tuple[x509.Certificate | None, Sequence[x509.Certificate]]:
    """The leaf the peer presented and the certificates it sent above it (raises ValueError when
    cryptography cannot read one)."""
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        return None, ()
    leaf = x509.load_der_x509_certificate(der)
    # On a server the unverified chain is the peer's whole Certificate message, the leaf first.  (Python
    # 3.13 names it SSLObject.get_unverified_chain; 3.11 has it on the C object only.)
    sent = ssl_object._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]
    above = [c.public_bytes(_ssl.ENCODING_DER) for c in sent]
    if above and above[0] == der:
        above = above[1:]
    return leaf, [x509.load_der_x509_certificate(c) for c in above]


class TlsProtocol(asyncio.Protocol):
    # One per connection, thousands alive at once: no per-instance dict.
    __slots__ = (
        "_closing",
        "_ctx",
        "_driver",
        "_guard",
        "_handshake_timer",
        "_incoming",
        "_opener",
        "_outgoing",
        "_ssl",
        "_stall_timer",
        "_transport",
    )

    def __init__(self, ctx: ssl.SSLContext, opener: Opener, guard: OutputGuard | None = None) -> None:
        self._ctx = ctx
        self._opener = opener
        self._guard = guard or OutputGuard()
        self._transport: asyncio.Transport | None = None
        self._ssl: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._driver: Inner | None = None
        self._closing = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's TCP transport is an asyncio.Transport in behaviour, not by class)
        self._transport = cast(asyncio.Transport, transport)
        guard = self._guard
        # Both asyncio's and uvloop's transports call pause_writing() from write() once the buffer is
        # above high, resume_writing() once their socket has taken it down to low.
        self._transport.set_write_buffer_limits(high=guard.high_water, low=guard.low_water)
        guard.connections.add(self)
        self._ssl = self._ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshake_timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self.close)

    # ------------------------------------------------------------------------------- back-pressure
    def pause_writing(self) -> None:
        """The peer is not reading what it is sent: read nothing more from it until it does, and drop it
        if it does not within the stall timeout."""
        guard, transport = self._guard, self._transport
        if transport is None or self in guard.stalled:
            return
        guard.stalled.add(self)
        transport.pause_reading()
        self._start_stall_timer()
        if isinstance(self._driver, FlowControlled):
            self._driver.pause_writing()

    def resume_writing(self) -> None:
        guard, transport = self._guard, self._transport
        if transport is None or self not in guard.stalled:
            return
        guard.stalled.discard(self)
        if self._stall_timer is not None and not self._closing:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._closing:
            return
        transport.resume_reading()
        if isinstance(self._driver, FlowControlled):
            self._driver.resume_writing()

    def _start_stall_timer(self) -> None:
        if self._stall_timer is None:
            loop = asyncio.get_running_loop()
            self._stall_timer = loop.call_later(self._guard.stall_timeout, self._stalled_out)

    def _stalled_out(self) -> None:
        self._stall_timer = None
        if self._transport is None or self.buffered <= self._guard.low_water:
            return
        self._drop(f"did not read for {self._guard.stall_timeout:g} s")

    def _drop(self, why: str) -> None:
        log.warning("dropping %s: %s bytes queued for it, %s", self._peer(), self.buffered, why)
        self._guard.dropped += 1
        self._abort()

    @property
    def buffered(self) -> int:
        """Bytes written for the peer that its socket has not taken yet."""
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def data_received(self, data: bytes) -> None:
        ssl_conn = self._ssl
        if ssl_conn is None or self._closing:
            return
        self._incoming.write(data)
        handshake_ended = False
        if self._driver is None:
            try:
                ssl_conn.do_handshake()
            except ssl.SSLWantReadError:
                self._flush_tls()
                return
            except ssl.SSLError as exc:
                log.info("TLS handshake with %s failed: %s", self._peer(), exc)
                self._flush_tls()
                self._abort()
                return
            self._flush_tls()
            self._handshake_done()
            if self._driver is None:
                return
            handshake_ended = True
        incoming = self._incoming
        # Read while bytes are left to decrypt: a read past the last record would only raise
        # SSLWantReadError, about half the CPU of the record itself.  (ssl leaves read-ahead off, so
        # what OpenSSL has not taken is still in the BIO.)  The C object's methods directly: the
        # SSLObject's are Python frames that only pass the call on.
        tls = ssl_conn._sslobj  # type: ignore[attr-defined]
        while not self._closing and (incoming.pending or tls.pending()):
            try:
                chunk = tls.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.close()
                break
            except ssl.SSLError as exc:
                log.info("TLS error from %s: %s", self._peer(), exc)
                self._abort()
                break
            if not chunk:  # the peer's close_notify
                self.close()
                break
            self._driver.data_received(chunk)
        if self._outgoing.pending:  # what reading made OpenSSL answer (the driver's writes flush themselves)
            self._flush_tls()
        if handshake_ended:
            # The two BIOs keep buffers the size of the handshake's flights (~1.7 KiB) for the
            # connection's life unless given back once emptied (membio.py).
            release(self._incoming)
            release(self._outgoing)

    def _handshake_done(self) -> None:
        assert self._ssl is not None and self._transport is not None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None  # (a cancelled timer kept is ~0.3 KiB a connection)
        try:
            leaf, chain = peer_certificates(self._ssl)
        except ValueError as exc:  # OpenSSL took it, cryptography cannot read it
            log.info("TLS peer %s presented a certificate that cannot be read: %s", self._peer(), exc)
            self._abort()
            return
        local = self._transport.get_extra_info("sockname") or ("", 0)
        remote = self._transport.get_extra_info("peername") or ("", 0)
        self._driver = self._opener(
            self, Peer(leaf, chain, (str(local[0]), int(local[1])), (str(remote[0]), int(remote[1])))
        )

    # ----------------------------------------------------------------------- Transport for the driver
    def write(self, data: bytes) -> None:
        if self._ssl is None or self._closing or not data:
            return
        try:
            self._ssl._sslobj.write(data)  # type: ignore[attr-defined]  # all of it: the BIO takes every record
        except ssl.SSLError as exc:
            log.info("TLS write to %s failed: %s", self._peer(), exc)
            self._abort()
            return
        self._flush_tls()

    def close(self) -> None:
        if self._closing or self._transport is None:
            return
        self._closing = True
        if self._ssl is not None:
            with contextlib.suppress(ssl.SSLError):  # close_notify written, the peer's not awaited
                self._ssl.unwrap()
            self._flush_tls(force=True)
        self._transport.close()  # the socket closes once its buffer is written ...
        if self.buffered:
            self._start_stall_timer()  # ... or once the stall timeout gives up on the peer

    # -------------------------------------------------------------------------------------- internals
    def _flush_tls(self, force: bool = False) -> None:
        if self._ssl is None or self._transport is None or (self._closing and not force):
            return
        out = self._outgoing.read()  # every record written so far
        if not out:
            return
        self._transport.write(out)
        if self in self._guard.stalled and self.buffered > self._guard.max_queued:
            self._drop(f"over {self._guard.max_queued} bytes")

    @property
    def closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        self._abort()

    def _abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _peer(self) -> object:
        return self._transport.get_extra_info("peername") if self._transport else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._guard.connections.discard(self)
        self._guard.stalled.discard(self)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        driver, self._driver = self._driver, None
        if driver is not None:
            driver.connection_lost()
        # Nothing kept that points back here (the transport holds this protocol, the driver this shell):
        # a closed connection is freed by reference counting alone, with no cycle left for the collector.
        self._ssl = None
        self._transport = None


async def start_tls_listener(
    opener: Opener,
    ctx: ssl.SSLContext,
    host: str,
    port: int,
    *,
    backlog: int = 4096,
    guard: OutputGuard | None = None,
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    shared = guard or OutputGuard()
    return await loop.create_server(
        lambda: TlsProtocol(ctx, opener, shared), host, port, reuse_address=True, backlog=backlog
    )


async def start_listener(
    broker: Broker,
    ctx: ssl.SSLContext,
    host: str,
    port: int,
    *,
    backlog: int = 4096,
    guard: OutputGuard | None = None,
) -> asyncio.Server:
    return await start_tls_listener(mqtt_opener(broker), ctx, host, port, backlog=backlog, guard=guard)
