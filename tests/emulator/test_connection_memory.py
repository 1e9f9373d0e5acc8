"""What a live connection keeps, trimmed (issue 30, memory per device): the memory BIOs give back the
handshake's buffers once emptied (``mqtt/membio.py``) and the TLS shell does so after each handshake; an
endpoint that reads credentials at CONNECT only gets a link without them; the driver's graceful-stop wait
works without a per-connection event object.  Real TLS (in memory, and over a loopback socket)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl

import pytest
from support.certs import TestCa

from azure_iot_emulator.mqtt import membio
from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.accept_any import LayoutError
from azure_iot_emulator.mqtt.broker import Broker
from azure_iot_emulator.mqtt.codec import StreamDecoder, encode
from azure_iot_emulator.mqtt.endpoint import handle_in_order
from azure_iot_emulator.mqtt.link import ConnectInfo, Link
from azure_iot_emulator.mqtt.tls import OutputGuard, TlsProtocol, server_context, start_listener
from azure_iot_emulator.store import Database


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestCa("emulator CA").server(tmp_path_factory.mktemp("pki"), ["127.0.0.1"])


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    return TestCa().issue(tmp_path_factory.mktemp("device"), "memory-device", self_signed=True)


def _client(device, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = version
    ctx.load_cert_chain(device.cert_path, device.key_path)
    return ctx


# ------------------------------------------------------------------------------------------- membio
def test_an_emptied_bio_gives_its_buffer_back_and_works_as_before() -> None:
    bio = ssl.MemoryBIO()
    bio.write(b"x" * 3000)
    assert membio.allocated(bio) >= 3000
    assert not membio.release(bio)  # bytes pending: nothing done
    assert bio.read(1000) == b"x" * 1000 and membio.allocated(bio) >= 2000
    bio.read()
    assert membio.allocated(bio) >= 3000  # drained, not shrunk: what OpenSSL does by itself
    assert membio.release(bio)
    assert membio.allocated(bio) == 0
    bio.write(b"after")
    assert bio.pending == 5 and bio.read() == b"after"
    bio.write_eof()
    assert bio.eof


def test_the_layout_is_proven_and_anything_else_is_refused() -> None:
    assert membio.layout_proven()
    with pytest.raises(LayoutError, match="not an ssl memory BIO"):
        membio.allocated(object())  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_tls_connection_whose_bios_were_released_carries_records_both_ways(pki, device, version) -> None:
    server = server_context(pki.cert_path, pki.key_path)
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = _client(device, version).wrap_bio(c_in, c_out)
    for _ in range(8):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert s.getpeercert(binary_form=True) == device.der
    assert membio.allocated(s_in) > 0 and membio.allocated(s_out) > 0  # the handshake's flights
    assert membio.release(s_in) and membio.release(s_out)
    for size in (100, 20_000):
        for sender, out, into, receiver in ((c, c_out, s_in, s), (s, s_out, c_in, c)):
            sender.write(b"u" * size)
            into.write(out.read())
            got = b""
            while len(got) < size:
                got += receiver.read(65536)
            assert got == b"u" * size


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


# ---------------------------------------------------------------------------------- the TLS shell
def _shells() -> list[object]:
    return [o for o in gc.get_objects() if isinstance(o, TlsProtocol)]


async def test_the_tls_shell_gives_the_handshake_buffers_back(tmp_path, pki, device, loopback_host) -> None:
    gc.collect()  # what earlier tests left is not this test's
    db = Database(tmp_path / "emulator.db")
    guard = OutputGuard()
    endpoint = Endpoint(True)
    broker = Broker(db, [endpoint])
    server = await start_listener(broker, server_context(pki.cert_path, pki.key_path), loopback_host, 0,
                                  guard=guard)  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    try:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            reader, writer = await asyncio.open_connection(loopback_host, port, ssl=_client(device, version))
            writer.write(encode(p.Connect(f"dev-{version.name}", True, 60, "user")))
            assert await reader.readexactly(4) == encode(p.ConnAck(0, False))
            (shell,) = guard.connections
            assert isinstance(shell, TlsProtocol)
            for bio in (shell._incoming, shell._outgoing):
                assert membio.allocated(bio) < 200  # the handshake's flights (> 500 bytes) were given back
            writer.write(encode(p.Publish("t", b"y" * 5000, 1, 7)))
            assert await reader.readexactly(4) == encode(p.PubAck(7))
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            del shell
            endpoint.links.clear()  # (what this test's endpoint kept; the hub's forgets a closed link)
            gc.disable()  # freed by reference counting alone: a closed connection leaves no cycle behind
            try:
                for _ in range(200):
                    if not guard.connections and not _shells():
                        break
                    await asyncio.sleep(0.01)
                assert not guard.connections
                assert not _shells(), "the closed TLS shell is still referenced (a cycle or a leak)"
            finally:
                gc.enable()
    finally:
        server.close()
        await broker.close()
        db.close()
