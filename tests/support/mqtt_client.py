"""A small asyncio MQTT 3.1.1 client over TLS for tests and benchmarks that need to send what the SDKs
never send (malformed packets, odd topics) or to run many light devices at once."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.codec import MalformedPacket, StreamDecoder, encode


def client_context(ca_pem: str, cert_path: str | None = None, key_path: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=ca_pem)
    if cert_path:
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


class MqttTestClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.packets: asyncio.Queue[p.Packet] = asyncio.Queue()
        self.publishes: asyncio.Queue[p.Publish] = asyncio.Queue()
        self.eof = asyncio.Event()
        self._next_id = 0
        self._task = asyncio.get_running_loop().create_task(self._read())
        self.auto_ack = True

    @classmethod
    async def open(
        cls, host: str, ctx: ssl.SSLContext, port: int = 8883, server_hostname: str | None = None
    ) -> MqttTestClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_hostname or host), 20
        )
        return cls(reader, writer)

    @classmethod
    async def connect(
        cls,
        host: str,
        ctx: ssl.SSLContext,
        *,
        client_id: str,
        username: str,
        password: bytes | None = None,
        clean_session: bool = False,
        keepalive: int = 60,
    ) -> tuple[MqttTestClient, p.ConnAck]:
        client = await cls.open(host, ctx)
        client.send(p.Connect(client_id, clean_session, keepalive, username, password))
        ack = await client.expect(p.ConnAck)
        return client, ack

    async def _read(self) -> None:
        decoder = StreamDecoder(max_packet_size=1 << 24)
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for packet in decoder.feed(data):
                    if isinstance(packet, p.Publish):
                        if packet.qos == 1 and self.auto_ack:
                            self.send(p.PubAck(packet.packet_id or 0))
                        self.publishes.put_nowait(packet)
                    else:
                        self.packets.put_nowait(packet)
        except (ConnectionError, ssl.SSLError, MalformedPacket, OSError):
            pass
        finally:
            self.eof.set()

    def packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def send(self, packet: p.Packet) -> None:
        self.send_raw(encode(packet))

    def send_raw(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def expect(self, kind: type, timeout: float = 10):
        packet = await asyncio.wait_for(self.packets.get(), timeout)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    async def subscribe(self, topic_filter: str, qos: int = 1) -> p.SubAck:
        self.send(p.Subscribe(self.packet_id(), ((topic_filter, qos),)))
        return await self.expect(p.SubAck)

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> p.PubAck | None:
        packet_id = self.packet_id() if qos else None
        self.send(p.Publish(topic, payload, qos, packet_id))
        if qos:
            return await self.expect(p.PubAck)
        return None

    async def next_publish(self, timeout: float = 10) -> p.Publish:
        return await asyncio.wait_for(self.publishes.get(), timeout)

    async def wait_closed(self, timeout: float = 10) -> bool:
        try:
            await asyncio.wait_for(self.eof.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
