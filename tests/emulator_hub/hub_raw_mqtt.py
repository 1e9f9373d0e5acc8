"""A deliberately small MQTT 3.1.1 client for tests that must send what the SDK never sends
(another device's topics, QoS 2, desired-property writes) and observe the server's reaction."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from dataclasses import dataclass


def _string(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def _remaining(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining(len(body)) + body


@dataclass
class Incoming:
    topic: str
    payload: bytes
    qos: int


class RawMqtt:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.messages: asyncio.Queue[Incoming] = asyncio.Queue()
        self._acks: dict[int, asyncio.Future[bytes]] = {}
        self._next_id = 0
        self.closed = asyncio.Event()
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        *,
        client_id: str,
        username: str,
        ca_pem: str,
        cert_path: str | None = None,
        key_path: str | None = None,
        password: str | None = None,
        port: int = 8883,
    ) -> tuple[RawMqtt, int]:
        context = ssl.create_default_context(cadata=ca_pem)
        if cert_path:
            context.load_cert_chain(cert_path, key_path)
        reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
        client = cls(reader, writer)
        client._task = asyncio.get_running_loop().create_task(client._read_loop())
        flags = 0x80 | 0x00  # username, clean_session=False like the SDK
        payload = _string(client_id) + _string(username)
        if password is not None:
            flags |= 0x40
            payload += _string(password)
        body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + payload
        writer.write(packet(0x10, body))
        await writer.drain()
        rc = await asyncio.wait_for(client.connack, 10)
        return client, rc

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def _read_loop(self) -> None:
        try:
            while True:
                first = (await self.reader.readexactly(1))[0]
                multiplier, length = 1, 0
                while True:
                    byte = (await self.reader.readexactly(1))[0]
                    length += (byte & 0x7F) * multiplier
                    multiplier *= 128
                    if not byte & 0x80:
                        break
                body = await self.reader.readexactly(length)
                kind = first >> 4
                if kind == 2 and not self.connack.done():
                    self.connack.set_result(body[1])
                elif kind in (4, 9, 11):  # PUBACK, SUBACK, UNSUBACK
                    pid = struct.unpack("!H", body[:2])[0]
                    future = self._acks.pop(pid, None)
                    if future and not future.done():
                        future.set_result(body[2:])
                elif kind == 3:
                    qos = (first >> 1) & 3
                    topic_len = struct.unpack("!H", body[:2])[0]
                    topic = body[2 : 2 + topic_len].decode("utf-8")
                    offset = 2 + topic_len
                    if qos:
                        pid = body[offset : offset + 2]
                        offset += 2
                        self.writer.write(packet(0x40, pid))
                    await self.messages.put(Incoming(topic, body[offset:], qos))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            if not self.connack.done():
                self.connack.set_exception(ConnectionError("closed before CONNACK"))
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(ConnectionError("connection closed"))
            self.closed.set()

    async def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 10) -> None:
        pid = self._packet_id()
        body = _string(topic) + (struct.pack("!H", pid) if qos else b"") + payload
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if qos == 1:
            self._acks[pid] = future
        self.writer.write(packet(0x30 | (qos << 1), body))
        await self.writer.drain()
        if qos == 1:
            await asyncio.wait_for(future, timeout)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        pid = self._packet_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks[pid] = future
        self.writer.write(packet(0x82, struct.pack("!H", pid) + _string(topic_filter) + bytes([qos])))
        await self.writer.drain()
        return (await asyncio.wait_for(future, 10))[0]

    async def wait_closed(self, timeout: float = 10) -> bool:
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(packet(0xE0, b""))
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
