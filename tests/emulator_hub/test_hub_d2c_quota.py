"""``--azure-quotas --hub-tier S1``: device-to-cloud messages past the tier's 100 per second are stored at
once but acknowledged late (Azure's traffic shaping over MQTT); nothing is lost or reordered."""

from __future__ import annotations

import asyncio
import time

import pytest
from azure.iot.hub import IoTHubRegistryManager
from support.emulator import EmulatorProcess
from test_hub_ingest_batch import TOPIC, acked, publish
from test_hub_mqtt_raw import connect, register, stored

pytestmark = pytest.mark.slow

BURST = 200  # twice S1's rate: the last of them is acknowledged about a second after the first


@pytest.fixture
def shaped_hub(tmp_path, monkeypatch):
    emu = EmulatorProcess(tmp_path / "emu", hubs=1, extra_args=["--azure-quotas", "--hub-tier", "S1"])
    emu.start()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emu.ca_path))
    try:
        registry = IoTHubRegistryManager.from_connection_string(emu.hub_connection_strings[0])
        yield emu, emu.default_hub, registry
    finally:
        emu.stop()


async def test_a_burst_over_the_tier_rate_is_acknowledged_late_and_all_stored(shaped_hub, tmp_path):
    emulator, host, rm = shaped_hub
    cert = await register(rm, tmp_path, "shaped")
    client, rc = await connect(emulator, host, cert)
    assert rc == 0
    try:
        futures = await acked(client, list(range(1, BURST + 1)))
        started = time.monotonic()
        topic = TOPIC.format("shaped")
        burst = [publish(topic, n, f'{{"n": {n}}}'.encode()) for n in range(1, BURST + 1)]
        client.writer.write(b"".join(burst))
        await asyncio.wait_for(asyncio.gather(*futures.values()), 60)
        # Either the burst itself took a second to arrive, or the hub held the acknowledgements back:
        # 200 messages are never all acknowledged within a second at 100 per second.
        assert time.monotonic() - started >= 1.0
    finally:
        await client.close()
    messages = await stored(emulator, "shaped", top=1000)
    assert [m["body"] for m in messages] == [{"n": n} for n in range(1, BURST + 1)]
