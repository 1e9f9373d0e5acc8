"""Fault injection: `device-client run` killed with SIGKILL after the hub acknowledged a message and before
the device committed that (DEVPROV_CRASH_AT=telemetry.before_commit), then restarted.  Counted: no message
acknowledged to the device is missing from the hub (lost = 0); the one the hub got twice carries the same
message id both times (duplicated without an id = 0), and ids are ``<device>:<seq>``."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter

import pytest
from device_cloud import enroll, received_telemetry
from support.waiting import until
from test_device_cli_run_emulator import _env, _identity, _start

from provkit.faults import CRASH_ENV

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180), pytest.mark.slow]


async def test_device_killed_between_the_hub_ack_and_its_commit_resends_with_the_same_id(emulator, tmp_path):
    guid = str(uuid.uuid4())
    root = tmp_path / "devices"
    await enroll(emulator, guid, _identity(root, guid), enabled=True)
    env = _env(emulator, root)

    crashing = await _start({**env, CRASH_ENV: "telemetry.before_commit@3"}, "run", guid, "--interval", "0.2")
    await asyncio.wait_for(crashing.communicate(), 120)
    assert crashing.returncode == -signal.SIGKILL
    assert [m["seq"] for m in await received_telemetry(emulator, guid)] == [1, 2, 3]

    restarted = await _start(env, "run", guid, "--interval", "0.2")

    async def enough() -> bool:
        return len(await received_telemetry(emulator, guid)) >= 8

    try:
        await until(enough, "eight messages at the hub", interval=0.2)
    finally:
        restarted.send_signal(signal.SIGTERM)
        await asyncio.wait_for(restarted.communicate(), 60)
    assert restarted.returncode == 0

    status = await _start(env, "status", guid, "--json")
    out, _ = await asyncio.wait_for(status.communicate(), 60)
    telemetry = json.loads(out)["telemetry"]
    received = await received_telemetry(emulator, guid)
    assert telemetry["dropped"] == 0
    # the outbox leaves in order: everything below its oldest pending message was acknowledged
    acknowledged = set(range(1, telemetry["next_seq"] - telemetry["pending"]))
    stored = {m["seq"] for m in received}
    lost = acknowledged - stored
    assert len(lost) == 0 and len(acknowledged) >= 7
    assert all(m["message_id"] == f"{guid}:{m['seq']}" for m in received)
    copies = Counter(m["seq"] for m in received)
    ids_per_seq = {seq: {m["message_id"] for m in received if m["seq"] == seq} for seq in copies}
    duplicated_without_id = sum(len(ids) > 1 for ids in ids_per_seq.values())
    assert duplicated_without_id == 0
    assert {seq: n for seq, n in copies.items() if n > 1} == {3: 2}  # the one whose ack was lost, once more
