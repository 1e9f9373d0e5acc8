"""The HTTPS listener on port 443 of a host: an aiohttp application served over the emulator's TLS shell
(``mqtt/tls.py``), so a request sees the client certificate the device presented, whatever CA issued it
(aiohttp's own TLS, Python's ``ssl`` as it comes, accepts only certificates of CAs it was given).

What it serves is an ordinary ``web.Application`` per address, as on Azure: the service REST API of the
host (the DPS's, or the hub's) is the app, and the routes that authenticate their callers themselves join
it with :func:`add_self_guarded_routes`: the DPS device API (``PUT /{idScope}/registrations/{id}/register``,
``GET .../operations/{operationId}``) and MQTT over WebSockets (``/$iothub/websocket``).  The service's SAS
guard lets those through (:func:`self_guarded`).  A handler reads the device's leaf with
:func:`peer_certificate`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from cryptography import x509

from azure_iot_emulator.mqtt.tls import Inner, OutputGuard, Peer, TlsProtocol, start_tls_listener

PEER_CERTIFICATE = "peer_certificate"
PEER_CHAIN = "peer_chain"
_SELF_GUARDED: web.AppKey[frozenset[web.AbstractResource]] = web.AppKey("self_guarded_resources", frozenset)


class _TlsTransport(asyncio.Transport):
    """The asyncio transport aiohttp's protocol writes to: plaintext in, TLS records out through the
    shell.  Output flow control is the shell's (:class:`_HttpConnection` passes its pause/resume on to
    aiohttp, whose handlers then wait in ``drain()``); aiohttp's own pause of reading is not needed for
    the small requests served here (a no-op)."""

    def __init__(self, tls: TlsProtocol, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self._tls.write(b"".join(bytes(d) for d in list_of_data))

    def is_closing(self) -> bool:
        return self._tls.closing

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None

    def is_reading(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self._tls.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def can_write_eof(self) -> bool:
        return False


class _HttpConnection:
    def __init__(self, protocol: asyncio.Protocol) -> None:
        self._protocol = protocol

    def data_received(self, data: bytes) -> None:
        self._protocol.data_received(data)

    def connection_lost(self) -> None:
        self._protocol.connection_lost(None)

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()


class HttpsListener:
    """One address's 443 listener: ``await start()``, ``await stop()``."""

    def __init__(
        self,
        app: web.Application,
        ctx: ssl.SSLContext,
        address: str,
        port: int,
        guard: OutputGuard | None = None,
    ) -> None:
        self.app = app
        self._ctx = ctx
        self._guard = guard
        self.address = address
        self.port = port
        self.bound_port = 0
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        await self._runner.setup()
        http = self._runner.server
        assert http is not None

        def open_http(tls: TlsProtocol, peer: Peer) -> Inner:
            protocol = http()
            transport = _TlsTransport(
                tls,
                {
                    "peername": peer.remote,
                    "sockname": peer.local,
                    PEER_CERTIFICATE: peer.leaf,
                    PEER_CHAIN: tuple(peer.chain),
                },
            )
            protocol.connection_made(transport)
            return _HttpConnection(protocol)

        self._server = await start_tls_listener(
            open_http, self._ctx, self.address, self.port, guard=self._guard
        )
        self.bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._runner.cleanup()


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The leaf certificate the client presented in the TLS handshake (None if it presented none)."""
    transport = request.transport
    return transport.get_extra_info(PEER_CERTIFICATE) if transport is not None else None


def peer_chain(request: web.Request) -> tuple[x509.Certificate, ...]:
    """The certificates the client sent above its leaf (empty if none)."""
    transport = request.transport
    return tuple(transport.get_extra_info(PEER_CHAIN) or ()) if transport is not None else ()


def local_port(request: web.Request) -> int | None:
    """The port the request reached (the listener's), whatever the Host header says."""
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return int(sockname[1]) if sockname else None


def add_self_guarded_routes(app: web.Application, routes: Iterable[web.RouteDef]) -> None:
    """Add routes whose handlers authenticate their callers themselves (the DPS device API by the device's
    certificate, MQTT over WebSockets by its CONNECT) to a service API's app, which then shares its listener
    with them; the service's guard lets their requests through (:func:`self_guarded`)."""
    added = {
        route.resource
        for definition in routes
        for route in definition.register(app.router)
        if route.resource is not None
    }
    app[_SELF_GUARDED] = app.get(_SELF_GUARDED, frozenset()) | added


def self_guarded(request: web.Request) -> bool:
    """True when one of the routes added by :func:`add_self_guarded_routes` matched the request (a service
    guard passes it on untouched); False for the service's own routes and for paths no route matched."""
    resource = request.match_info.route.resource
    return resource is not None and resource in request.app.get(_SELF_GUARDED, frozenset())
