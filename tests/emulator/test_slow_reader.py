"""A peer that sends requests and never reads the answers, against a real emulator process: its queued
output stays near the high-water mark (the emulator stops reading from it), other devices are served
meanwhile, and it is dropped once it has not read for the stall timeout (``--stalled-peer-timeout``)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import pytest
from conftest import running_emulator
from support.certs import TestCa
from support.metrics import scrape
from support.mqtt_client import MqttTestClient, client_context
from support.waiting import until

from azure_iot_emulator.dps.topics import RESPONSE_FILTER
from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.codec import encode
from azure_iot_emulator.mqtt.tls import HIGH_WATER

# seconds; long beside the few round trips the test makes while the flooder is stalled, even on a loaded
# machine (a bystander's connect and subscribe must finish before the flooder is dropped)
STALL_TIMEOUT = 12
BOUND = HIGH_WATER + 1024 * 1024  # the high-water mark plus what a few socket reads of requests answer


class Flooder:
    """A DPS client (its own self-signed certificate: DPS lets any device connect, attestation comes with
    the register request) that sends PINGREQs as fast as its socket takes them and never reads past the
    CONNACK; its receive buffer is kept small so the answers pile up on the emulator's side."""

    def __init__(self, host: str, context: ssl.SSLContext, connect: bytes) -> None:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(120)
        raw.connect((host, 8883))
        self.sock = context.wrap_socket(raw, server_hostname=host)
        self.sock.sendall(connect)
        assert self.sock.recv(4)[:1] == b"\x20"  # CONNACK: the last thing it reads
        self.sent = 0
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._flood, daemon=True)
        self.thread.start()

    def _flood(self) -> None:
        block = encode(p.PingReq()) * 32768
        try:
            while True:
                self.sock.sendall(block)
                self.sent += len(block)
        except OSError as exc:  # reset by the emulator when it drops us (or the timeout, failing the test)
            self.error = exc


def dps_connect(emu, registration_id: str) -> p.Connect:
    username = f"{emu.id_scope}/registrations/{registration_id}/api-version=2019-03-31"
    return p.Connect(registration_id, True, 0, username, None)  # keepalive 0: only the stall ends it


@pytest.mark.slow
async def test_a_peer_that_never_reads_is_paused_bounded_and_dropped_while_others_are_served(tmp_path):
    args = ["--metrics-listen", "127.0.0.1:0", "--stalled-peer-timeout", str(STALL_TIMEOUT)]
    with running_emulator(tmp_path / "emulator", args, hubs=1) as emu:
        url = emu.connection["metrics_url"]
        ca = TestCa()
        flooder_cert = ca.issue(tmp_path, "flooder", self_signed=True)
        context = client_context(emu.ca_pem, str(flooder_cert.cert_path), str(flooder_cert.key_path))
        flooder = await asyncio.to_thread(
            Flooder, emu.dps_host, context, encode(dps_connect(emu, "flooder"))
        )

        async def stalled() -> bool:
            return (await scrape(url)).value("iot_emulator_stalled_peers") == 1

        await until(stalled, "the emulator stops reading from the flooder", timeout=60)
        during = await scrape(url)
        assert HIGH_WATER <= during.value("iot_emulator_queued_output_bytes") <= BOUND
        assert flooder.sent > BOUND  # it sent far more than the emulator holds for it

        # Another device is served meanwhile, on the same listener.
        other_cert = ca.issue(tmp_path, "bystander", self_signed=True)
        other_context = client_context(emu.ca_pem, str(other_cert.cert_path), str(other_cert.key_path))
        connect = dps_connect(emu, "bystander")
        client, ack = await MqttTestClient.connect(
            emu.dps_host, other_context, client_id="bystander", username=connect.username
        )
        assert ack.return_code == p.ACCEPTED
        suback = await client.subscribe(RESPONSE_FILTER)
        assert suback.return_codes == (1,)
        still = await scrape(url)
        assert still.value("iot_emulator_stalled_peers") == 1  # served while the flooder was stalled
        assert still.value("iot_emulator_queued_output_bytes") <= BOUND
        assert still.value("iot_emulator_stalled_peers_dropped_total") == 0

        async def dropped() -> bool:
            return (await scrape(url)).value("iot_emulator_stalled_peers_dropped_total") == 1

        await until(dropped, "the flooder is dropped", timeout=STALL_TIMEOUT + 60)
        await asyncio.to_thread(flooder.thread.join, 60)
        assert isinstance(flooder.error, ConnectionError | ssl.SSLError), flooder.error
        after = await scrape(url)
        assert after.value("iot_emulator_stalled_peers") == 0
        assert after.value("iot_emulator_queued_output_bytes") < HIGH_WATER
        status = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=x"
        await client.publish(status, b"")
        answer = await client.next_publish()
        assert answer.topic.startswith("$dps/registrations/res/")  # still served after the drop
        await client.close()
        flooder.sock.close()
        assert "dropping" in emu.log_text()
