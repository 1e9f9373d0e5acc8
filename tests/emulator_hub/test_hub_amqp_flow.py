"""AMQP flow control on the hub's 5671, with a raw proton client: a sender flooding cloud-to-device
messages faster than the hub stores them has at most the credit window in flight and every message it was
told was accepted is in the devices' queues; an unexpected error in a handler closes that connection only,
with ``amqp:internal-error``."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

import pytest
from amqp_peer import AmqpPeer, exchange
from conftest import free_loopback_address
from proton import Delivery, Message

from azure_iot_emulator.amqp.connection import AmqpConnection, LinkRefused
from azure_iot_emulator.app import Emulator
from azure_iot_emulator.config import EmulatorConfig
from azure_iot_emulator.hub.amqp_endpoint import C2D_ADDRESS, C2dSender
from azure_iot_emulator.hub.c2d import C2dMessage
from azure_iot_emulator.hub.registry import DeviceSpec
from azure_iot_emulator.sas import generate_sas

WINDOW = 100  # AmqpConnection's receive_credit, what the hub gives a receiving link


class GatedStore:
    """The hub's C2D queue behind a gate the test opens: until then every message waits to be stored."""

    def __init__(self, queue: C2dSender) -> None:
        self.queue = queue
        self.open = asyncio.Event()
        self.arrived = 0

    async def send_c2d(self, hub: str, device_id: str, message: C2dMessage) -> None:
        self.arrived += 1
        await self.open.wait()
        await self.queue.send_c2d(hub, device_id, message)


@pytest.mark.slow
async def test_a_c2d_flood_has_at_most_the_credit_window_in_flight_and_loses_nothing(tmp_path):
    host = free_loopback_address()
    config = EmulatorConfig(
        data_dir=tmp_path / "emu", dps_host=free_loopback_address(), hub_hosts=(host,), https_port=0
    ).validated()
    emulator = Emulator(config)
    await emulator.start()
    try:
        assert emulator.hub is not None and emulator.secrets is not None and emulator.pki is not None
        devices = [f"flood-{i}" for i in range(4)]
        for device_id in devices:
            emulator.hub.registry.create_device(host, DeviceSpec(device_id, auth_type="sas"))
        endpoint = emulator.hub.amqp_endpoint(host)
        assert endpoint.c2d is not None
        gate = GatedStore(endpoint.c2d)
        endpoint.c2d = gate

        context = ssl.create_default_context(cafile=str(emulator.pki.ca_path))
        reader, writer = await asyncio.open_connection(
            host, config.amqp_port, ssl=context, server_hostname=host
        )
        peer = AmqpPeer(host)
        token = generate_sas(
            host, emulator.secrets.hub_key(host), policy="iothubowner", expiry=int(time.time()) + 600
        )
        grant = peer.put_token(token, host)
        await exchange(peer, reader, writer, lambda: peer.cbs_answer(grant) == 202, "the token's answer")
        link = peer.sender(C2D_ADDRESS)
        await exchange(peer, reader, writer, lambda: link.credit == WINDOW, "the link's credit")

        total = 3 * WINDOW // 2  # 150: at most 38 per device, within the hub's 50 per device
        deliveries = []
        for i in range(total):
            to = f"/devices/{devices[i % 4]}/messages/devicebound"
            message = Message(body=f"m{i}".encode(), id=f"msg-{i}", address=to)
            message.inferred = True
            deliveries.append(peer.send(link, message))
        # (a sender's credit counts its queued deliveries against it: negative when it has more to send)
        rest = total - WINDOW
        await exchange(peer, reader, writer, lambda: gate.arrived and link.queued == rest, "a window")
        # A round trip after the flood: any credit the hub had given back would have arrived before it.
        again = peer.put_token(token, host)
        await exchange(peer, reader, writer, lambda: peer.cbs_answer(again) == 202, "the second answer")
        assert link.queued == rest  # the rest waits on the sender's side, not in the hub
        assert link.credit == -link.queued  # no credit came back
        assert sum(d.remote_state == Delivery.ACCEPTED for d in deliveries) == 0

        gate.open.set()

        def settled() -> bool:
            return all(d.remote_state == Delivery.ACCEPTED and d.settled for d in deliveries)

        await exchange(peer, reader, writer, settled, "every message accepted")
        assert gate.arrived == total
        store, now = emulator.hub.service.c2d.store, emulator.clock()
        stored = [m.message.message_id for device_id in devices for m in store.live(host, device_id, now)]
        assert sorted(stored) == sorted(f"msg-{i}" for i in range(total))
        writer.close()
    finally:
        await emulator.stop()


class Failing:
    """A connection handler with a bug: attaching anything but $cbs raises."""

    def __init__(self, connection: AmqpConnection) -> None:
        self.connection = connection

    def link_opening(self, link) -> None:
        if link.remote_target.address == "refused":
            raise LinkRefused("amqp:not-found", "no such node")
        raise RuntimeError("a bug in the handler")

    def message(self, link, delivery, message) -> None:
        raise AssertionError("no message expected")

    def credit(self, link) -> None:
        pass

    def link_closed(self, link) -> None:
        pass


class Wire:
    """The server side's socket: what the connection wrote, and whether it closed."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True


def pump(peer: AmqpPeer, server: AmqpConnection, wire: Wire, done: Callable[[], bool]) -> None:
    for _ in range(50):
        data = peer.output()
        if data:
            server.data_received(data)
        if wire.out:
            peer.feed(bytes(wire.out))
            wire.out.clear()
        if done():
            return
    raise AssertionError("no progress")


async def test_an_unexpected_handler_error_closes_that_connection_with_internal_error(caplog):
    wire = Wire()
    server = AmqpConnection(wire, Failing)
    peer = AmqpPeer("hub")
    refused = peer.sender("refused")  # a refusal the handler means: the connection stays open
    pump(peer, server, wire, lambda: refused.remote_condition is not None)
    assert refused.remote_condition.name == "amqp:not-found"
    assert not wire.closed and peer.connection.remote_condition is None
    with caplog.at_level(logging.ERROR, logger="azure_iot_emulator.amqp.connection"):
        peer.sender("anything")
        pump(peer, server, wire, lambda: wire.closed)
    condition = peer.connection.remote_condition
    assert condition is not None and condition.name == "amqp:internal-error"
    assert "a bug in the handler" in caplog.text and "Traceback" in caplog.text
