"""The telemetry store on a real SQLite file."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from azure_iot_emulator.hub.telemetry import MAX_MESSAGE_BYTES, MessageTooLarge, TelemetryStore
from azure_iot_emulator.hub.topics import PropertyBag
from azure_iot_emulator.store import Database


def clock():
    return datetime(2026, 5, 1, 10, 11, 12, 123456, tzinfo=UTC)


def test_append_recent_after_and_reopen(tmp_path):
    db = Database(tmp_path / "e.db")
    store = TelemetryStore(db, clock)
    first = store.append("h", "a", PropertyBag({"messageId": "1"}, {"k": "v"}), b'{"t": 1}')
    store.append("h", "b", PropertyBag(), b"\xff\x00")
    third = store.append("h", "a", PropertyBag(), b"plain")
    assert first.enqueued_time == "2026-05-01T10:11:12.1234560Z"
    assert [m.seq for m in store.recent(device_id="a")] == [first.seq, third.seq]
    assert [m.device_id for m in store.after(first.seq)] == ["b", "a"]
    assert store.recent(device_id="a", limit=1)[0].body == b"plain"
    as_json = store.recent(device_id="b")[0].to_json()
    assert as_json["body"] is None and as_json["bodyBase64"] == "/wA="
    assert first.to_json()["body"] == {"t": 1} and first.to_json()["properties"] == {"k": "v"}
    db.close()
    reopened = TelemetryStore(Database(tmp_path / "e.db"), clock)
    assert reopened.last_seq() == third.seq


def test_too_large_is_refused_and_not_stored(tmp_path):
    store = TelemetryStore(Database(tmp_path / "e.db"), clock)
    store.append("h", "a", PropertyBag(), b"x" * MAX_MESSAGE_BYTES)
    with pytest.raises(MessageTooLarge):
        store.append("h", "a", PropertyBag(), b"x" * (MAX_MESSAGE_BYTES + 1))
    assert len(store.recent()) == 1
