"""DeviceRuntime against the real emulator subprocess, with Microsoft's unchanged device SDK.

Identities come from a small test CA (the factory has its own tests; test_provision_factory.py covers the
gRPC path); the operator's side (enroll, activate, delete, desired properties) goes through Microsoft's
service SDKs against the emulator's REST APIs.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from datetime import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from device_cloud import (
    activate,
    deactivate,
    delete_hub_device,
    enroll,
    get_twin,
    received_telemetry,
    set_desired,
)
from runtime_wait import snapshot_until
from support.certs import TestCa
from support.waiting import until

from device_client.runtime import DeviceRuntime, DeviceState, RuntimeSnapshot
from device_client.settings import Settings, load_settings
from device_client.state import StateDir

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


@pytest.fixture(scope="module")
def ca() -> TestCa:
    return TestCa()


class Device:
    """One test device: identity in a state dir, settings pointing at the emulator, a runtime on demand."""

    def __init__(self, root, emulator, ca: TestCa, **overrides) -> None:
        self.guid = f"dev-{uuid.uuid4()}"
        self.emulator = emulator
        key_pem, chain_pem = ca.identity(self.guid)
        self.state = StateDir(root, self.guid)
        self.state.write_identity(
            key_pem=key_pem, chain_pem=chain_pem, metadata={"guid": self.guid}, force=False
        )
        self.leaf_pem = x509.load_pem_x509_certificates(chain_pem)[0].public_bytes(Encoding.PEM).decode()
        values = {
            "state_root": str(root),
            "id_scope": emulator.id_scope,
            "global_endpoint": emulator.dps_host,
            "trusted_ca_file": str(emulator.ca_path),
            "telemetry_interval_s": 0.2,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1.0,
            "sdk_timeout_s": 15,
        }
        values.update(overrides)
        self.settings: Settings = load_settings(env={}, overrides=values)
        self.runtime: DeviceRuntime | None = None
        self.task: asyncio.Task[None] | None = None
        self.snapshots: list[RuntimeSnapshot] = []

    def start(self) -> DeviceRuntime:
        self.runtime = DeviceRuntime(self.guid, self.settings, on_change=self.snapshots.append)
        self.task = asyncio.create_task(self.runtime.run())
        return self.runtime

    async def stop(self) -> RuntimeSnapshot:
        assert self.runtime is not None and self.task is not None
        self.runtime.stop()
        await asyncio.wait_for(self.task, 30)
        return self.runtime.snapshot

    async def until(
        self, predicate: Callable[[RuntimeSnapshot], bool], timeout: float = 30.0
    ) -> RuntimeSnapshot:
        assert self.runtime is not None and self.task is not None
        return await snapshot_until(self.runtime, self.task, predicate, timeout)

    def backoffs(self) -> int:
        """Back-offs begun so far: every refused or failed attempt waits one out."""
        flags = [s.backing_off for s in self.snapshots]
        return sum(1 for before, now in zip([False, *flags], flags, strict=False) if now and not before)


@pytest.fixture
async def device(request, tmp_path, ca, monkeypatch):
    """Devices on the test's emulator: its own (``emulator``) where the test stops or kills it, else the
    module's (``module_emulator``; each device has its own identity, so nothing one test does is seen by
    another)."""
    own = "emulator" in request.fixturenames
    emulator = request.getfixturevalue("emulator" if own else "module_emulator")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))  # azure-iot-hub (requests) trusts it
    made: list[Device] = []

    def make(**overrides) -> Device:
        d = Device(tmp_path / f"state{len(made)}", emulator, ca, **overrides)
        made.append(d)
        return d

    yield make
    for d in made:
        if d.task is not None and not d.task.done():
            d.runtime.stop()
            await asyncio.wait_for(asyncio.gather(d.task, return_exceptions=True), 30)


def _seqs(messages: list[dict]) -> list[int]:
    return [m["seq"] for m in messages]


async def test_first_run_after_activation_reaches_telemetry(module_emulator, device):
    d = device()
    await enroll(module_emulator, d.guid, d.leaf_pem, enabled=False)
    await activate(module_emulator, d.guid)
    d.start()
    snap = await d.until(lambda s: s.telemetry_sent >= 3)
    assert snap.assigned_hub == module_emulator.default_hub
    assert snap.device_id == d.guid
    assert snap.registrations == 1
    final = await d.stop()
    assert final.state is DeviceState.STOPPED
    cached = d.state.read_assignment()
    assert cached is not None and cached.assigned_hub == module_emulator.default_hub
    received = await received_telemetry(module_emulator, d.guid)
    seqs = _seqs(received)
    assert seqs[:3] == [1, 2, 3]
    first = received[0]
    assert first["content_type"] == "application/json"
    assert first["content_encoding"] == "utf-8"
    # the message id ($.mid on the wire) is the device and its persisted sequence: a resend repeats it
    assert [m["message_id"] for m in received[:3]] == [f"{d.guid}:{n}" for n in (1, 2, 3)]
    assert set(first["body"]["readings"]) == {"temperatureC", "humidityPct", "supplyVoltageV"}


async def test_device_started_before_activation_waits_then_succeeds(module_emulator, device):
    d = device()
    await enroll(module_emulator, d.guid, d.leaf_pem, enabled=False)
    d.start()
    await d.until(lambda s: s.state is DeviceState.WAITING_FOR_ACTIVATION)
    refused = d.backoffs()
    await d.until(lambda s: d.backoffs() >= refused + 2)  # two refused attempts later: waiting, not crashed
    assert d.runtime.snapshot.state is DeviceState.WAITING_FOR_ACTIVATION
    assert not d.task.done()
    assert d.runtime.snapshot.telemetry_sent == 0
    twin = {
        "tags": {"line": "A"},
        "properties": {"desired": {"telemetryIntervalSeconds": 0.3, "machine": "M7"}},
    }
    await activate(module_emulator, d.guid, initial_twin=twin)
    snap = await d.until(lambda s: s.telemetry_sent >= 1)
    assert snap.interval_s == 0.3  # the initial twin from activation was applied
    reported = (await get_twin(module_emulator, d.guid)).properties.reported
    assert reported["telemetryIntervalSeconds"]["ac"] == 200
    assert reported["telemetryIntervalSeconds"]["value"] == 0.3
    assert reported["machine"]["value"] == "M7"
    assert WAITING_STATES_SEEN(d.snapshots)


def WAITING_STATES_SEEN(snapshots: list[RuntimeSnapshot]) -> bool:
    states = [s.state for s in snapshots]
    w = states.index(DeviceState.WAITING_FOR_ACTIVATION)
    return DeviceState.CONNECTED in states[w:] or DeviceState.SENDING in states[w:]


async def test_second_run_uses_the_cached_assignment(module_emulator, device):
    d = device()
    await enroll(module_emulator, d.guid, d.leaf_pem, enabled=True)
    d.start()
    await d.until(lambda s: s.telemetry_sent >= 2)
    first = await d.stop()
    assert first.registrations == 1
    d.start()
    snap = await d.until(lambda s: s.telemetry_sent >= 2)
    assert snap.registrations == 0  # straight to the hub, no DPS registration
    await d.stop()
    seqs = _seqs(await received_telemetry(module_emulator, d.guid))
    assert seqs == sorted(seqs)
    assert max(seqs) > first.last_seq_sent  # numbering continues across runs


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_emulator_restart_mid_run_keeps_order(emulator, device, how):
    d = device()
    await enroll(emulator, d.guid, d.leaf_pem, enabled=True)
    d.start()
    await d.until(lambda s: s.telemetry_sent >= 2)
    await asyncio.to_thread(emulator.stop if how == "stop" else emulator.kill)
    await d.until(lambda s: s.pending >= 4)  # produced while the hub is down
    await asyncio.to_thread(emulator.start)
    sent_before = d.runtime.snapshot.telemetry_sent
    produced = d.runtime.snapshot.pending + sent_before
    await d.until(lambda s: s.telemetry_sent >= produced + 1, timeout=60)
    await d.stop()
    seqs = _seqs(await received_telemetry(emulator, d.guid))
    unique = list(dict.fromkeys(seqs))  # at-least-once: a resend after a lost ack may repeat one
    assert unique == sorted(unique)
    assert unique == list(range(1, unique[-1] + 1))  # nothing lost, in order, across the outage


async def test_device_deleted_on_the_hub_reprovisions(module_emulator, device):
    d = device()
    await enroll(module_emulator, d.guid, d.leaf_pem, enabled=True)
    d.start()
    await d.until(lambda s: s.telemetry_sent >= 1)
    await d.stop()
    await delete_hub_device(module_emulator, d.guid)
    d.start()
    snap = await d.until(lambda s: s.telemetry_sent >= 2)
    assert snap.registrations == 1  # the hub refused the cached assignment; DPS put it back
    await d.stop()


async def test_desired_interval_property_changes_the_interval(module_emulator, device):
    d = device(telemetry_interval_s=60.0)
    await enroll(module_emulator, d.guid, d.leaf_pem, enabled=True)
    d.start()
    await d.until(lambda s: s.state in (DeviceState.CONNECTED, DeviceState.SENDING) and s.telemetry_sent >= 1)
    assert d.runtime.snapshot.interval_s == 60.0
    await set_desired(module_emulator, d.guid, {"telemetryIntervalSeconds": 0.2})
    snap = await d.until(lambda s: s.interval_s == 0.2)
    # Five more messages take 300 s at the old 60 s interval, about one at the new one: the wait's bound
    # separates the two by far more than any machine's slowness.
    await d.until(lambda s: s.telemetry_sent >= snap.telemetry_sent + 5, timeout=80)
    ack = await reported_ack(module_emulator, d.guid, lambda a: a["value"] == 0.2)
    assert ack["ac"] == 200
    await set_desired(module_emulator, d.guid, {"telemetryIntervalSeconds": "fast"})
    ack = await reported_ack(module_emulator, d.guid, lambda a: a["ac"] != 200)
    assert ack["ac"] == 400 and ack["value"] == 0.2  # refused, the interval in force is reported
    assert d.runtime.snapshot.interval_s == 0.2


async def reported_ack(emulator, device_id: str, predicate, timeout: float = 20.0) -> dict:
    reported: dict = {}

    async def matching() -> dict | None:
        reported.update((await get_twin(emulator, device_id)).properties.reported)
        ack = reported.get("telemetryIntervalSeconds")
        return ack if isinstance(ack, dict) and predicate(ack) else None

    return await until(
        matching, lambda: f"no matching acknowledgement; reported = {reported}", timeout=timeout, interval=0.1
    )


async def test_outage_beyond_the_buffer_bound_drops_the_oldest_and_counts(emulator, device):
    d = device(buffer_max_messages=3)
    await enroll(emulator, d.guid, d.leaf_pem, enabled=True)
    d.start()
    await d.until(lambda s: s.telemetry_sent >= 1)
    await asyncio.to_thread(emulator.stop)
    snap = await d.until(lambda s: s.dropped >= 2)
    assert snap.pending == 3  # the bound holds during the outage
    await asyncio.to_thread(emulator.start)
    await d.until(lambda s: s.pending <= 1 and s.telemetry_sent >= snap.telemetry_sent + 3, timeout=60)
    final = await d.stop()
    seqs = list(dict.fromkeys(_seqs(await received_telemetry(emulator, d.guid))))
    assert seqs == sorted(seqs)
    missing = sorted(set(range(1, seqs[-1] + 1)) - set(seqs))
    # The dropped messages are the oldest of the outage: one contiguous run.  A message in flight when
    # the link died may have reached the hub without its acknowledgement reaching us, so it can be
    # counted as dropped and still have arrived (at-least-once).
    assert missing == list(range(missing[0], missing[0] + len(missing)))
    assert final.dropped - 1 <= len(missing) <= final.dropped
    assert d.state.read_assignment() is not None


async def test_deactivated_while_running_goes_back_to_waiting(module_emulator, device):
    d = device()
    await enroll(module_emulator, d.guid, d.leaf_pem, enabled=True)
    d.start()
    await d.until(lambda s: s.telemetry_sent >= 1)
    await deactivate(module_emulator, d.guid)  # enrollment disabled + hub device deleted, as Deactivate does
    snap = await d.until(lambda s: s.state is DeviceState.WAITING_FOR_ACTIVATION)
    assert d.state.read_assignment() is None  # the refused assignment was dropped
    assert not d.task.done()
    await activate(module_emulator, d.guid)
    await d.until(
        lambda s: s.telemetry_sent > snap.telemetry_sent and s.state is not DeviceState.WAITING_FOR_ACTIVATION
    )


async def test_first_boot_while_dps_is_down_retries_until_it_is_back(emulator, device):
    d = device()
    await enroll(emulator, d.guid, d.leaf_pem, enabled=True)
    await asyncio.to_thread(emulator.stop)
    d.start()
    await d.until(lambda s: s.state is DeviceState.REGISTERING and s.last_error is not None)
    assert "unreachable" in d.runtime.snapshot.last_error
    failed = d.backoffs()
    await d.until(lambda s: d.backoffs() >= failed + 2)  # two failed attempts later it still tries
    assert not d.task.done()
    await asyncio.to_thread(emulator.start)
    snap = await d.until(lambda s: s.telemetry_sent >= 1, timeout=60)
    assert snap.registrations == 1


async def test_messages_are_one_interval_apart_from_the_first(module_emulator, device):
    """The twin's interval arrives with the first connection, after the first message was produced: it
    moves the next message's due time, it does not send the second message at once."""
    d = device(telemetry_interval_s=30.0)
    twin = {"properties": {"desired": {"telemetryIntervalSeconds": 1.0}}}
    await enroll(module_emulator, d.guid, d.leaf_pem, enabled=False)
    await activate(module_emulator, d.guid, initial_twin=twin)
    d.start()
    await d.until(lambda s: s.telemetry_sent >= 3)
    await d.stop()
    received = await received_telemetry(module_emulator, d.guid)
    stamps = [datetime.fromisoformat(m["body"]["timestamp"]) for m in received[:3]]
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(stamps)]
    assert all(gap >= 0.95 for gap in gaps), gaps  # one interval of the device's own clock, not ~0
