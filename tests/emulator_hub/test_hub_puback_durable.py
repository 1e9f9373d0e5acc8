"""A PUBACK means the message is committed: SIGKILL the emulator the moment a PUBACK arrives, while
several devices keep publishing (each keeps WINDOW messages in flight, so their messages share group
commits and some are always on their way), and every message that was acknowledged before the kill is in
the store after a restart."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import pytest
from azure.iot.hub import IoTHubRegistryManager
from hub_raw_mqtt import RawMqtt
from support.emulator import EmulatorProcess
from test_hub_ingest_batch import TOPIC, acked, publish
from test_hub_mqtt_raw import connect, register, stored

pytestmark = pytest.mark.slow

DEVICES = 4
MESSAGES = 300  # per device, written back to back
WINDOW = 20
KILL_AT = 150  # device 0's PUBACK for this packet id kills the emulator


async def test_sigkill_right_after_a_puback_loses_no_acknowledged_message(tmp_path, monkeypatch):
    emulator = EmulatorProcess(tmp_path / "emu", hubs=1)
    emulator.start()
    try:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))
        host = emulator.default_hub
        rm = IoTHubRegistryManager.from_connection_string(emulator.hub_connection_strings[0])
        names = [f"durable-{i}" for i in range(DEVICES)]
        certs = [await register(rm, tmp_path, name) for name in names]
        clients = []
        for cert in certs:
            client, rc = await connect(emulator, host, cert)
            assert rc == 0
            clients.append(client)
        pids = list(range(1, MESSAGES + 1))
        futures = [await acked(client, pids) for client in clients]
        assert emulator.proc is not None
        pid = emulator.proc.pid
        futures[0][KILL_AT].add_done_callback(lambda _: os.kill(pid, signal.SIGKILL))

        def send(name: str, client: RawMqtt, n: int) -> None:
            client.writer.write(publish(TOPIC.format(name), n, f"{name}:{n}".encode()))

        def next_one(name: str, client: RawMqtt, n: int) -> Callable[[asyncio.Future[bytes]], None]:
            def sent(acked: asyncio.Future[bytes]) -> None:
                if acked.exception() is None and n <= MESSAGES:
                    send(name, client, n)

            return sent

        for name, client, device_futures in zip(names, clients, futures, strict=True):
            for n in pids:  # each PUBACK lets the message WINDOW further on go
                device_futures[n].add_done_callback(next_one(name, client, n + WINDOW))
            for n in pids[:WINDOW]:
                send(name, client, n)
        for client in clients:
            await asyncio.wait_for(client.closed.wait(), 30)  # the kill ends every connection
        emulator.kill()
        acknowledged = {
            f"{name}:{n}"
            for name, device_futures in zip(names, futures, strict=True)
            for n, future in device_futures.items()
            if future.done() and not future.cancelled() and future.exception() is None
        }
        assert f"{names[0]}:{KILL_AT}" in acknowledged
        assert len(acknowledged) < DEVICES * MESSAGES  # the kill came before the end: a real crash point

        emulator.start()  # same data directory and addresses
        kept: set[str] = set()
        for name in names:
            kept |= {m["body"] for m in await stored(emulator, name, top=MESSAGES)}
        assert acknowledged <= kept
    finally:
        emulator.kill()
