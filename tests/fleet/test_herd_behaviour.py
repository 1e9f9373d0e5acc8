"""How a device behaves in a herd: full-jitter back-off and a spread first attempt (distributions checked,
nothing timed), and a real DeviceRuntime that meets the emulator's registration quota (429 +
retry-after, ``--azure-quotas``) waits at least the retry-after before asking again -- read from the
emulator's own log of the requests it answered, not from the test's clock."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import sys
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "device"))
from device_cloud import enroll
from support.certs import TestCa
from support.emulator import EmulatorProcess
from support.mqtt_client import MqttTestClient, client_context

from device_client.backoff import Backoff, first_attempt_delay
from device_client.runtime import DeviceRuntime
from device_client.settings import load_settings
from device_client.state import StateDir


def _deciles(values: list[float], top: float) -> list[int]:
    counts = [0] * 10
    for v in values:
        counts[min(9, int(v / top * 10))] += 1
    return counts


def test_first_attempts_spread_uniformly_over_the_window():
    rng = random.Random(20)
    delays = [first_attempt_delay(10.0, rng) for _ in range(5000)]
    assert all(0.0 <= d <= 10.0 for d in delays)
    # every tenth of the window gets about a tenth of the devices: no lock step, no clump at either end
    assert all(400 <= n <= 600 for n in _deciles(delays, 10.0)), _deciles(delays, 10.0)
    assert first_attempt_delay(0.0, rng) == 0.0


def test_full_jitter_spreads_retries_below_the_capped_exponential():
    rng = random.Random(21)
    fleet = [Backoff(1.0, 8.0, _rng=rng) for _ in range(4000)]
    for attempt, cap in enumerate([1.0, 2.0, 4.0, 8.0, 8.0]):
        delays = [b.next_delay() for b in fleet]
        assert all(0.0 <= d <= cap for d in delays), attempt
        assert all(300 <= n <= 500 for n in _deciles(delays, cap)), (attempt, _deciles(delays, cap))


def test_a_retry_after_is_a_floor_and_is_recorded():
    backoff = Backoff(0.5, 2.0, _rng=random.Random(22))
    delays = [backoff.next_delay(retry_after_s=7.0) for _ in range(20)]
    assert all(d >= 7.0 for d in delays)
    assert [w.retry_after_s for w in backoff.schedule] == [7.0] * 20
    assert [w.delay_s for w in backoff.schedule] == delays


def _register_lines(log_text: str, reg_id: str) -> list[tuple[datetime, str]]:
    """(when, message) of every register request of ``reg_id`` the emulator answered, from its JSON log."""
    out = []
    for line in log_text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = str(entry.get("msg") or entry.get("message") or "")
        if message.startswith(f"DPS register {reg_id}:"):
            out.append((datetime.fromisoformat(entry["ts"]), message))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_device_answered_429_waits_at_least_the_retry_after(tmp_path):
    emu = EmulatorProcess(tmp_path / "emu", hubs=1, extra_args=["--azure-quotas"])
    emu.start()
    ca = TestCa()
    flood_key, flood_chain = ca.identity("flooder")
    (tmp_path / "f.key").write_bytes(flood_key)
    (tmp_path / "f.pem").write_bytes(flood_chain)
    client, _ = await MqttTestClient.connect(
        emu.dps_host,
        client_context(emu.ca_pem, str(tmp_path / "f.pem"), str(tmp_path / "f.key")),
        client_id="flooder",
        username=f"{emu.id_scope}/registrations/flooder/api-version=2019-03-31",
    )
    stop_flood = asyncio.Event()

    async def flood() -> None:  # register requests without an enrollment: each costs a quota token
        body = json.dumps({"registrationId": "flooder", "payload": None}).encode()
        n = 0
        while not stop_flood.is_set():
            n += 1
            await client.publish(f"$dps/registrations/PUT/iotdps-register/?$rid=f{n}", body)
            while not client.publishes.empty():
                client.publishes.get_nowait()

    try:
        for attempt in range(5):  # the device may, rarely, catch a refilled token before the flood does
            guid = f"herd-{attempt}-{random.randrange(1 << 32):08x}"
            key_pem, chain_pem = ca.identity(guid)
            StateDir(tmp_path / "devices", guid).write_identity(
                key_pem=key_pem, chain_pem=chain_pem, metadata={"guid": guid}, force=False
            )
            leaf = chain_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
            await enroll(emu, guid, leaf.decode(), enabled=True)
            stop_flood.clear()
            flooding = asyncio.create_task(flood())
            while "429" not in emu.log_text().rsplit("DPS register flooder", 1)[-1]:
                await asyncio.sleep(0.1)  # the quota is spent
            settings = load_settings(
                env={},
                overrides={
                    "state_root": str(tmp_path / "devices"),
                    "id_scope": emu.id_scope,
                    "global_endpoint": emu.dps_host,
                    "trusted_ca_file": str(emu.ca_path),
                    "sdk_timeout_s": 60,
                },
            )
            runtime = DeviceRuntime(guid, settings)
            running = asyncio.create_task(runtime.run())
            while f"DPS register {guid}: 429" not in emu.log_text() and runtime.snapshot.registrations == 0:
                await asyncio.sleep(0.1)
            stop_flood.set()
            await flooding
            while runtime.snapshot.registrations == 0 and not running.done():
                await asyncio.sleep(0.1)
            runtime.stop()
            await asyncio.wait_for(running, 60)
            lines = _register_lines(emu.log_text(), guid)
            if any(": 429 " in m for _, m in lines):
                break
        else:
            raise AssertionError("the device never met the quota in five tries")
    finally:
        stop_flood.set()
        await client.close()
        emu.stop()
    assert runtime.snapshot.registrations == 1
    assert "202" in lines[-1][1] or "200" in lines[-1][1], lines
    for (when, message), (after, _next) in itertools.pairwise(lines):
        retry = re.search(r"retry after (\d+) s", message)
        if retry:
            assert (after - when).total_seconds() >= int(retry.group(1)), (message, when, after)
