"""MQTT over WebSockets (``wss://{host}:443/$iothub/websocket``, subprotocol ``mqtt``), as the device SDKs
use it with ``websockets=True``: a route of the HTTPS listener (``azure_iot_emulator/https.py``) whose
binary messages carry the same MQTT byte stream as port 8883.  The connection goes to the same broker
with the client certificate of the TLS handshake, so routing, authentication (X.509 or SAS) and sessions
are exactly those of 8883."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSMsgType, web

from azure_iot_emulator.https import PEER_CHAIN, peer_certificate
from azure_iot_emulator.mqtt.broker import Broker

log = logging.getLogger(__name__)

PATH = "/$iothub/websocket"
SUBPROTOCOL = "mqtt"


class _WebSocketTransport:
    """What the broker writes to: bytes become binary messages, sent in order by one task."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._sender = asyncio.get_running_loop().create_task(self._send())

    def write(self, data: bytes) -> None:
        self._queue.put_nowait(bytes(data))

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def _send(self) -> None:
        try:
            while (data := await self._queue.get()) is not None:
                await self._ws.send_bytes(data)
        except (ConnectionError, RuntimeError) as exc:
            log.info("MQTT over WebSocket: send failed: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                await self._ws.close()

    async def finish(self) -> None:
        self.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._sender, 5)


def websocket_route(broker: Broker) -> web.RouteDef:
    async def mqtt_over_websocket(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), autoping=True)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="expected a WebSocket upgrade with subprotocol mqtt")
        await ws.prepare(request)
        if ws.ws_protocol != SUBPROTOCOL:
            await ws.close(code=1002, message=b"subprotocol mqtt required")
            return ws
        transport = _WebSocketTransport(ws)
        extra = request.transport.get_extra_info if request.transport is not None else None
        local = extra("sockname") if extra else None
        remote = extra("peername") if extra else None
        driver = broker.open_connection(
            transport,
            peer_certificate=peer_certificate(request),
            peer_chain=tuple(extra(PEER_CHAIN) or ()) if extra else (),
            local_address=(str(local[0]), int(local[1])) if local else ("", 0),
            remote_address=(str(remote[0]), int(remote[1])) if remote else ("", 0),
        )
        try:
            async for message in ws:
                if message.type == WSMsgType.BINARY:
                    driver.data_received(message.data)
                elif message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break
                else:  # text frames are not MQTT
                    break
        finally:
            driver.connection_lost()
            await transport.finish()
        return ws

    return web.get(PATH, mqtt_over_websocket)
