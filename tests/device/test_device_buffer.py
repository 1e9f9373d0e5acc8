from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from device_client.buffer import TelemetryBuffer, read_stats
from device_client.errors import StateError
from device_client.telemetry import CONTENT_ENCODING, CONTENT_TYPE, build_body, to_sdk_message


def _factory(seq: int) -> tuple[str, datetime, bytes]:
    now = datetime.now(UTC)
    return f"m-{seq}", now, build_body("dev", seq, now)


async def test_in_order_ack_and_survives_reopen(tmp_path):
    buf = await TelemetryBuffer.open(tmp_path / "t.db", capacity=100)
    for _ in range(5):
        await buf.append(_factory)
    assert [m.seq for m in await buf.peek(10)] == [1, 2, 3, 4, 5]
    await buf.acknowledge(1)
    await buf.acknowledge(2)
    await buf.close()
    again = await TelemetryBuffer.open(tmp_path / "t.db", capacity=100)
    assert [m.seq for m in await again.peek(10)] == [3, 4, 5]
    assert (await again.append(_factory)).seq == 6  # sequence numbers never repeat across restarts
    stats = await again.stats()
    assert (stats.pending, stats.sent, stats.dropped, stats.oldest_seq) == (4, 2, 0, 3)
    await again.close()
    assert read_stats(tmp_path / "t.db", capacity=100) == stats


async def test_bound_drops_oldest_and_counts(tmp_path):
    buf = await TelemetryBuffer.open(tmp_path / "t.db", capacity=3)
    for _ in range(7):
        await buf.append(_factory)
    assert [m.seq for m in await buf.peek(10)] == [5, 6, 7]
    assert (await buf.stats()).dropped == 4
    await buf.acknowledge(2)  # dropped meanwhile: nothing happens
    assert (await buf.stats()).sent == 0
    await buf.close()


async def test_smaller_bound_after_restart_trims(tmp_path):
    buf = await TelemetryBuffer.open(tmp_path / "t.db", capacity=10)
    for _ in range(6):
        await buf.append(_factory)
    await buf.close()
    small = await TelemetryBuffer.open(tmp_path / "t.db", capacity=2)
    await small.append(_factory)
    assert [m.seq for m in await small.peek(10)] == [6, 7]
    assert (await small.stats()).dropped == 5
    await small.close()


async def test_failed_body_factory_allocates_nothing(tmp_path):
    buf = await TelemetryBuffer.open(tmp_path / "t.db", capacity=10)

    def broken(seq: int):
        raise RuntimeError("sensor failed")

    # A broken message fails alone, even when it shares its group commit with good ones.
    results = await asyncio.gather(
        buf.append(_factory), buf.append(broken), buf.append(_factory), return_exceptions=True
    )
    assert isinstance(results[1], RuntimeError)
    assert [m.seq for m in results if not isinstance(m, BaseException)] == [1, 2]
    assert (await buf.append(_factory)).seq == 3
    await buf.close()


async def test_corrupted_buffer_file(tmp_path):
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError) as err:
        await TelemetryBuffer.open(path, capacity=10)
    assert err.value.reason == "BUFFER_CORRUPTED"


async def test_buffer_from_a_newer_program_is_refused(tmp_path):
    path = tmp_path / "t.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 7")
    with pytest.raises(StateError) as err:
        await TelemetryBuffer.open(path, capacity=10)
    assert err.value.reason == "BUFFER_SCHEMA_UNKNOWN"
    assert "version 7" in str(err.value) and "version 1" in str(err.value)


async def test_many_devices_appending_at_once_keep_every_message(tmp_path: Path) -> None:
    """Several buffers on one event loop, many appends in flight on each: every append answered is on disk
    (read back after reopening), in order, with no sequence number lost or repeated, and appends that
    arrived together shared commits."""
    devices, per_device = 4, 60
    buffers = [await TelemetryBuffer.open(tmp_path / f"d{i}" / "t.db", capacity=1000) for i in range(devices)]

    async def produce(buf: TelemetryBuffer, n: int) -> list[int]:
        return [(await buf.append(_factory)).seq for _ in range(n)]

    try:
        answered = await asyncio.gather(*(produce(buf, 6) for buf in buffers for _ in range(per_device // 6)))
        commits = [buf._writes.commits for buf in buffers]
    finally:
        for buf in buffers:
            await buf.close()
    for i in range(devices):
        seqs = sorted(seq for chunk in answered[i * 10 : (i + 1) * 10] for seq in chunk)
        assert seqs == list(range(1, per_device + 1))
        again = await TelemetryBuffer.open(tmp_path / f"d{i}" / "t.db", capacity=1000)
        try:
            assert [m.seq for m in await again.peek(1000)] == list(range(1, per_device + 1))
        finally:
            await again.close()
    assert all(c < per_device for c in commits)  # grouped: fewer commits than messages


@pytest.mark.slow
async def test_a_failed_group_commit_fails_every_append_of_it_and_other_devices_go_on(tmp_path: Path) -> None:
    """Another process holds the write lock of device A's file past the busy timeout: every append of the
    group that was waiting fails and none is stored, while device B on the same event loop keeps storing;
    once the lock is gone, A's next append takes the next sequence number."""
    a = await TelemetryBuffer.open(tmp_path / "a" / "t.db", capacity=100)
    b = await TelemetryBuffer.open(tmp_path / "b" / "t.db", capacity=100)
    await a.append(_factory)
    other = sqlite3.connect(tmp_path / "a" / "t.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # the writer lock, held by "another process"
        group = asyncio.gather(*(a.append(_factory) for _ in range(5)), return_exceptions=True)
        stored_by_b = [(await b.append(_factory)).seq for _ in range(3)]  # B has its own thread and file
        results = await group
        other.execute("ROLLBACK")
        assert stored_by_b == [1, 2, 3]
        assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
        assert [m.seq for m in await a.peek(10)] == [1]
        assert (await a.append(_factory)).seq == 2
    finally:
        other.close()
        await a.close()
        await b.close()


def test_message_construction():
    now = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    body = build_body("dev-1", 42, now)
    doc = json.loads(body)
    assert doc["seq"] == 42 and doc["deviceId"] == "dev-1"
    assert doc["timestamp"] == "2026-01-02T03:04:05.678+00:00"
    assert set(doc["readings"]) == {"temperatureC", "humidityPct", "supplyVoltageV"}
    msg = to_sdk_message(42, "mid-1", body)
    assert msg.message_id == "mid-1"
    assert msg.content_type == CONTENT_TYPE == "application/json"
    assert msg.content_encoding == CONTENT_ENCODING == "utf-8"
    assert msg.custom_properties == {"seq": "42"}
    assert msg.data == body
