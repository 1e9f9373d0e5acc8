"""What a live connection keeps, trimmed (issue 30, memory per device): an endpoint that reads credentials
at CONNECT only gets a link without them; the driver's graceful-stop wait works without a per-connection
event object."""

from __future__ import annotations

import asyncio

import pytest
from support.certs import TestCa

from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.broker import Broker
from azure_iot_emulator.mqtt.codec import StreamDecoder, encode
from azure_iot_emulator.mqtt.endpoint import handle_in_order
from azure_iot_emulator.mqtt.link import ConnectInfo, Link
from azure_iot_emulator.store import Database


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    return TestCa().issue(tmp_path_factory.mktemp("device"), "memory-device", self_signed=True)


# ---------------------------------------------------------------------------------- the MQTT core
class Wire:
    def __init__(self) -> None:
        self.decoder = StreamDecoder()
        self.received: list[p.Packet] = []
        self.driver = None

    def write(self, data: bytes) -> None:
        self.received += self.decoder.feed(data)

    def close(self) -> None:
        if self.driver is not None:
            asyncio.get_running_loop().call_soon(self.driver.connection_lost)


class Endpoint:
    name = "test"
    keeps_sessions = False

    def __init__(self, forgets: bool | None) -> None:
        if forgets is not None:
            self.forgets_credentials = forgets
        self.seen: list[ConnectInfo] = []
        self.links: list[Link] = []
        self.handled = 0

    def claims(self, info: ConnectInfo) -> bool:
        return True

    async def authenticate(self, info: ConnectInfo) -> int:
        self.seen.append(info)
        return 0

    async def on_connected(self, link: Link) -> None:
        self.links.append(link)

    async def on_closed(self, link: Link) -> None:
        pass

    def may_subscribe(self, link, topic_filter: str) -> bool:
        return True

    def submit_publishes(self, link, publishes, after) -> asyncio.Future[None]:
        async def handle(packet: p.Publish) -> None:
            self.handled += 1

        return handle_in_order(publishes, after, handle)


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.mark.parametrize("forgets", [True, False, None])
async def test_credentials_are_dropped_after_connect_only_where_the_endpoint_says_so(
    tmp_path, device, forgets
) -> None:
    db = Database(tmp_path / "emulator.db")
    try:
        endpoint = Endpoint(forgets)
        broker = Broker(db, [endpoint])
        wire = Wire()
        cert = device.certificate
        driver = broker.open_connection(wire, peer_certificate=cert, peer_chain=[cert])
        wire.driver = driver
        driver.data_received(encode(p.Connect("dev-1", True, 60, "user", b"secret")))
        await _settle()
        assert wire.received == [p.ConnAck(0, False)]
        (seen,) = endpoint.seen
        presented = (cert, (cert,), b"secret")
        assert (seen.peer_certificate, seen.peer_chain, seen.password) == presented  # authenticate sees them
        (link,) = endpoint.links
        kept = (link.info.peer_certificate, link.info.peer_chain, link.info.password)
        assert kept == ((None, (), None) if forgets else presented)
        assert (link.info.client_id, link.info.username, link.info.keepalive) == ("dev-1", "user", 60)
        # ... and the connection works as before: a burst of publishes and pings in one read, in order
        burst = b"".join(
            encode(p.Publish("t", b"x", 1, i)) + encode(p.PingReq()) for i in range(1, 3001)
        )
        driver.data_received(burst)
        for _ in range(100):
            await _settle()
            if len([x for x in wire.received if isinstance(x, p.PubAck)]) == 3000:
                break
        acks = [x.packet_id for x in wire.received if isinstance(x, p.PubAck)]
        assert acks == list(range(1, 3001))
        assert sum(isinstance(x, p.PingResp) for x in wire.received) == 3000
        await broker.close()  # waits for every transport to go (the driver's transport_gone)
        assert broker.connection_count == 0
    finally:
        db.close()
