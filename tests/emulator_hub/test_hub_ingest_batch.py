"""Publishes that arrive back to back (one TLS write) are stored with one commit and acknowledged
together, in order; a forbidden publish in the middle of such a burst still gets the ones before it
acknowledged and stored, the ones after it neither, and closes only that connection."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hub_raw_mqtt import _string, packet
from test_hub_mqtt_raw import connect, hub, register, stored  # noqa: F401 - `hub` is a fixture

pytestmark = pytest.mark.slow

TOPIC = "devices/{}/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&kind=burst"


def publish(topic: str, packet_id: int, payload: bytes) -> bytes:
    return packet(0x32, _string(topic) + struct.pack("!H", packet_id) + payload)


async def acked(client, packet_ids: list[int]) -> None:
    futures = {pid: asyncio.get_running_loop().create_future() for pid in packet_ids}
    client._acks.update(futures)  # the raw client resolves these as PUBACKs arrive
    return futures


async def test_burst_is_stored_and_acknowledged_in_order(hub, tmp_path):  # noqa: F811
    emulator, host, rm = hub
    cert = await register(rm, tmp_path, "burst-a")
    client, rc = await connect(emulator, host, cert)
    assert rc == 0
    try:
        futures = await acked(client, list(range(1, 41)))
        client.writer.write(
            b"".join(publish(TOPIC.format("burst-a"), n, f'{{"n": {n}}}'.encode()) for n in range(1, 41))
        )
        await asyncio.wait_for(asyncio.gather(*futures.values()), 10)
    finally:
        await client.close()
    messages = await stored(emulator, "burst-a")
    assert [m["body"] for m in messages] == [{"n": n} for n in range(1, 41)]
    assert all(m["properties"] == {"kind": "burst"} for m in messages)
    assert all(m["systemProperties"]["contentType"] == "application/json" for m in messages)


async def test_forbidden_publish_inside_a_burst(hub, tmp_path):  # noqa: F811
    emulator, host, rm = hub
    cert_a = await register(rm, tmp_path, "burst-b")
    cert_c = await register(rm, tmp_path, "burst-c")
    a, rc = await connect(emulator, host, cert_a)
    assert rc == 0
    c, rc = await connect(emulator, host, cert_c)
    assert rc == 0
    try:
        futures = await acked(a, [1, 2, 3, 4, 5])
        a.writer.write(
            publish(TOPIC.format("burst-b"), 1, b"one")
            + publish(TOPIC.format("burst-b"), 2, b"two")
            + publish(TOPIC.format("burst-c"), 3, b"someone else's topic")
            + publish(TOPIC.format("burst-b"), 4, b"after the violation")
            + publish(TOPIC.format("burst-b"), 5, b"after the violation")
        )
        assert await a.wait_closed()
        assert [futures[n].done() and not futures[n].exception() for n in (1, 2)] == [True, True]
        assert all(futures[n].done() and futures[n].exception() for n in (3, 4, 5))  # closed, no PUBACK
        await c.publish(TOPIC.format("burst-c"), b"still fine", qos=1)
        assert not c.closed.is_set()
    finally:
        await a.close()
        await c.close()
    assert [m["body"] for m in await stored(emulator, "burst-b")] == ["one", "two"]
    assert [m["body"] for m in await stored(emulator, "burst-c")] == ["still fine"]
