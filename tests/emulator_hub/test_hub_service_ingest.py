"""Telemetry ingest through the hub domain: group commit keeps every message, in order per device."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from azure_iot_emulator.hub.part import HubPart
from azure_iot_emulator.hub.registry import DeviceSpec, HubRegistry
from azure_iot_emulator.hub.service import HubError, HubService
from azure_iot_emulator.hub.telemetry import TelemetryStore
from azure_iot_emulator.hub.topics import PropertyBag
from azure_iot_emulator.store import Database


def now():
    return datetime.now(UTC)


@pytest.fixture
def service(tmp_path):
    db = Database(tmp_path / "emulator.db")
    yield HubService(HubRegistry(db, ["h"], now), TelemetryStore(db, now), now)
    db.close()


async def test_concurrent_devices_all_stored_in_order(service):
    async def device(i: int) -> list[int]:
        seqs = []
        for n in range(10):
            message = await service.ingest("h", f"d{i}", PropertyBag({}, {"n": str(n)}), f"{i}:{n}".encode())
            seqs.append(message.seq)
        return seqs

    results = await asyncio.gather(*(device(i) for i in range(20)))
    assert all(seqs == sorted(seqs) for seqs in results)
    assert len({seq for seqs in results for seq in seqs}) == 200
    stored = service.telemetry.recent(hub="h", device_id="d7", limit=100)
    assert [m.body for m in stored] == [f"7:{n}".encode() for n in range(10)]


async def test_oversized_message_refused_and_not_stored(service):
    with pytest.raises(HubError) as info:
        await service.ingest("h", "d", PropertyBag(), b"x" * (256 * 1024 + 1))
    assert info.value.status == 413
    assert service.telemetry.recent() == []


async def test_telemetry_moves_the_senders_last_activity_time(tmp_path):
    """Azure updates a device's lastActivityTime on each device-to-cloud message; so does the emulator,
    in the commit that stores the message (other devices keep theirs)."""
    clock = [datetime(2026, 1, 1, 12, 0, tzinfo=UTC)]
    db = Database(tmp_path / "emulator.db")
    try:
        hub = HubPart(db, ["h"], lambda: clock[0], dict)  # as the emulator wires it
        registry, service = hub.registry, hub.service
        for device_id in ("sender", "quiet"):
            registry.create_device("h", DeviceSpec(device_id=device_id))
        registry.set_connection_state("h", "sender", True)
        connected_at = registry.get_device("h", "sender").last_activity
        clock[0] += timedelta(minutes=7)
        message = await service.ingest("h", "sender", PropertyBag(), b"{}")
        sender, quiet = registry.get_device("h", "sender"), registry.get_device("h", "quiet")
        assert sender.last_activity == message.enqueued_time != connected_at
        assert sender.last_activity.startswith("2026-01-01T12:07:00")
        assert quiet.last_activity != sender.last_activity
    finally:
        db.close()
