from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from device_client.buffer import TelemetryBuffer
from device_client.errors import StateError
from device_client.telemetry import CONTENT_ENCODING, CONTENT_TYPE, build_body, to_sdk_message


def _factory(seq: int) -> tuple[str, datetime, bytes]:
    now = datetime.now(UTC)
    return f"m-{seq}", now, build_body("dev", seq, now)


def test_in_order_ack_and_survives_reopen(tmp_path):
    buf = TelemetryBuffer(tmp_path / "t.db", capacity=100)
    for _ in range(5):
        buf.append(_factory)
    assert [m.seq for m in buf.peek(10)] == [1, 2, 3, 4, 5]
    buf.acknowledge(1)
    buf.acknowledge(2)
    buf.close()
    again = TelemetryBuffer(tmp_path / "t.db", capacity=100)
    assert [m.seq for m in again.peek(10)] == [3, 4, 5]
    assert again.append(_factory).seq == 6  # sequence numbers never repeat across restarts
    stats = again.stats()
    assert (stats.pending, stats.sent, stats.dropped, stats.oldest_seq) == (4, 2, 0, 3)


def test_bound_drops_oldest_and_counts(tmp_path):
    buf = TelemetryBuffer(tmp_path / "t.db", capacity=3)
    for _ in range(7):
        buf.append(_factory)
    assert [m.seq for m in buf.peek(10)] == [5, 6, 7]
    assert buf.stats().dropped == 4
    buf.acknowledge(2)  # dropped meanwhile: nothing happens
    assert buf.stats().sent == 0


def test_smaller_bound_after_restart_trims(tmp_path):
    buf = TelemetryBuffer(tmp_path / "t.db", capacity=10)
    for _ in range(6):
        buf.append(_factory)
    buf.close()
    small = TelemetryBuffer(tmp_path / "t.db", capacity=2)
    small.append(_factory)
    assert [m.seq for m in small.peek(10)] == [6, 7]
    assert small.stats().dropped == 5


def test_failed_body_factory_allocates_nothing(tmp_path):
    buf = TelemetryBuffer(tmp_path / "t.db", capacity=10)

    def broken(seq: int):
        raise RuntimeError("sensor failed")

    with pytest.raises(RuntimeError):
        buf.append(broken)
    assert buf.append(_factory).seq == 1


def test_corrupted_buffer_file(tmp_path):
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError) as err:
        TelemetryBuffer(path, capacity=10)
    assert err.value.reason == "BUFFER_CORRUPTED"


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
