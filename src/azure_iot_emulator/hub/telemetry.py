"""Durable device-to-cloud telemetry (SQLite table ``hub_messages``).

Every accepted message is written before the device gets its PUBACK.  Readers (the REST endpoint, the
``messages`` and ``monitor`` CLI commands, possibly in another process on the same file) read by
sequence number, so tailing is ``after_seq`` polling of an indexed integer column.

The same table holds the hub's own notifications that routes send to the built-in endpoint (twin changes,
identity lifecycle, connection state: ``source`` says which, ``Telemetry`` for device messages), so every
event of the built-in endpoint has one numbering (its offset); the telemetry readers skip them.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import jsonsafe
from azure_iot_emulator.hub.timefmt import azure_time
from azure_iot_emulator.hub.topics import PropertyBag
from azure_iot_emulator.store import Database

MAX_MESSAGE_BYTES = 256 * 1024  # Azure's device-to-cloud message size limit
TELEMETRY = "Telemetry"  # the source of device messages (``iothub-message-source``)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS hub_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        hub TEXT NOT NULL,
        device_id TEXT NOT NULL,
        enqueued_time TEXT NOT NULL,
        system_properties TEXT NOT NULL,
        application_properties TEXT NOT NULL,
        body BLOB NOT NULL,
        source TEXT NOT NULL DEFAULT 'Telemetry'
    )""",
    "CREATE INDEX IF NOT EXISTS hub_messages_device ON hub_messages (hub, device_id, seq)",
)


class MessageTooLarge(ValueError):
    pass


@dataclass(frozen=True)
class StoredMessage:
    seq: int
    hub: str
    device_id: str
    enqueued_time: str
    system_properties: dict[str, str]
    application_properties: dict[str, str]
    body: bytes
    source: str = TELEMETRY

    def body_text(self) -> str | None:
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def to_json(self) -> dict[str, Any]:
        text = self.body_text()
        body: Any
        if text is None:
            body = None
        else:
            try:  # a device's body, whatever it sent: what jsonsafe refuses is shown as the text
                body = jsonsafe.loads(text)
            except jsonsafe.JsonRefused:
                body = text
        return {
            "sequenceNumber": self.seq,
            "deviceId": self.device_id,
            "hub": self.hub,
            "enqueuedTimeUtc": self.enqueued_time,
            "systemProperties": self.system_properties,
            "properties": self.application_properties,
            "body": body,
            "bodyBase64": base64.b64encode(self.body).decode("ascii"),
        }


def _from_row(row: sqlite3.Row) -> StoredMessage:
    return StoredMessage(
        seq=row["seq"],
        hub=row["hub"],
        device_id=row["device_id"],
        enqueued_time=row["enqueued_time"],
        system_properties=json.loads(row["system_properties"]),
        application_properties=json.loads(row["application_properties"]),
        body=bytes(row["body"]),
        source=row["source"],
    )


# Called inside the transaction that stores a batch: (connection, the batch's (hub, device id) pairs, its
# enqueue time).  The hub's registry uses it to move each sender's lastActivityTime, as Azure does on every
# device-to-cloud message, in the same commit as the messages.
InsertHook = Callable[[sqlite3.Connection, set[tuple[str, str]], str], None]
# Also called inside that transaction: (connection, (sequence number, hub, device id) of each message the
# built-in endpoint serves, in order).  The built-in endpoint gives each its partition and sequence number.
PositionHook = Callable[[sqlite3.Connection, Sequence[tuple[int, str, str]]], None]
# Whether a device message goes to the built-in endpoint (the hub's routes): (hub, device id, properties,
# body).  Messages it refuses are still stored (the hub's telemetry record), without a position.
BuiltinFilter = Callable[[str, str, PropertyBag, bytes], bool]


def _per_hub(items: Sequence[tuple[str, str, PropertyBag, bytes]]) -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = {}
    for hub, _, _, body in items:
        messages, size = counts.get(hub, (0, 0))
        counts[hub] = (messages + 1, size + len(body))
    return counts


class TelemetryMetrics(Protocol):
    def telemetry(self, hub_counts: Mapping[str, tuple[int, int]], seconds: float) -> None: ...


class TelemetryStore:
    def __init__(
        self,
        db: Database,
        clock: Callable[[], datetime],
        *,
        create_schema: bool = True,
        on_insert: InsertHook | None = None,
        on_positions: PositionHook | None = None,
        metrics: TelemetryMetrics | None = None,
        to_builtin: BuiltinFilter | None = None,
    ) -> None:
        """``to_builtin``: which device messages the built-in endpoint gets (None: all of them)."""
        self._db = db
        self._clock = clock
        self._on_insert = on_insert
        self._on_positions = on_positions
        self._to_builtin = to_builtin
        self._metrics = metrics
        if create_schema:
            db.register_schema(*SCHEMA)

    def append(self, hub: str, device_id: str, properties: PropertyBag, body: bytes) -> StoredMessage:
        return self.append_many([(hub, device_id, properties, body)])[0]

    def append_many(self, items: list[tuple[str, str, PropertyBag, bytes]]) -> list[StoredMessage]:
        """Store several messages in one transaction (all or none)."""
        first, enqueued = self.insert(items)
        return [
            StoredMessage(
                first + i,
                hub,
                device_id,
                enqueued,
                dict(properties.system),
                dict(properties.application),
                body,
            )
            for i, (hub, device_id, properties, body) in enumerate(items)
        ]

    def insert(self, items: Sequence[tuple[str, str, PropertyBag, bytes]]) -> tuple[int, str]:
        """Store ``items`` (hub, device id, property bag, body) in one transaction, all or none, with one
        enqueue time; returns the first item's sequence number (the rest follow consecutively) and that
        enqueue time.  No per-message objects beyond the row tuples."""
        for _, _, _, body in items:
            if len(body) > MAX_MESSAGE_BYTES:
                raise MessageTooLarge(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
        enqueued = azure_time(self._clock())
        started = time.perf_counter()
        with self._db.transaction() as conn:
            conn.executemany(
                """INSERT INTO hub_messages (hub, device_id, enqueued_time, system_properties,
                   application_properties, body) VALUES (?, ?, ?, ?, ?, ?)""",
                [
                    (hub, device_id, enqueued, properties.system_json, properties.application_json, body)
                    for hub, device_id, properties, body in items
                ],
            )
            # One writer inside one transaction: the batch got consecutive sequence numbers.
            last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            first = last - len(items) + 1
            if self._on_insert is not None:
                self._on_insert(conn, {(hub, device_id) for hub, device_id, _, _ in items}, enqueued)
            if self._on_positions is not None:
                route = self._to_builtin
                self._on_positions(
                    conn,
                    [
                        (first + i, item[0], item[1])
                        for i, item in enumerate(items)
                        if route is None or route(*item)
                    ],
                )
        if self._metrics is not None:
            self._metrics.telemetry(_per_hub(items), time.perf_counter() - started)
        return first, enqueued

    def insert_event(
        self,
        hub: str,
        device_id: str,
        source: str,
        system: Mapping[str, str],
        application: Mapping[str, str],
        body: bytes,
    ) -> StoredMessage:
        """Store one of the hub's own notifications for the built-in endpoint (``source``: its
        ``iothub-message-source``), with its position; joins the caller's transaction, so the change it
        reports and the event commit together or not at all."""
        enqueued = azure_time(self._clock())
        with self._db.transaction() as conn:
            seq = conn.execute(
                """INSERT INTO hub_messages (hub, device_id, enqueued_time, system_properties,
                   application_properties, body, source) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (
                    hub,
                    device_id,
                    enqueued,
                    json.dumps(dict(system)),
                    json.dumps(dict(application)),
                    body,
                    source,
                ),
            ).lastrowid
            assert seq is not None
            if self._on_positions is not None:
                self._on_positions(conn, [(seq, hub, device_id)])
        return StoredMessage(seq, hub, device_id, enqueued, dict(system), dict(application), body, source)

    def recent(
        self, *, hub: str | None = None, device_id: str | None = None, limit: int = 20
    ) -> list[StoredMessage]:
        """The newest ``limit`` messages, oldest first."""
        where, params = self._filters(hub, device_id)
        rows = self._db.query(
            f"SELECT * FROM hub_messages {where} ORDER BY seq DESC LIMIT ?",  # noqa: S608 - fixed fragments
            (*params, limit),
        )
        return [_from_row(row) for row in reversed(rows)]

    def after(
        self, seq: int, *, hub: str | None = None, device_id: str | None = None, limit: int = 500
    ) -> list[StoredMessage]:
        """Messages with a sequence number above ``seq``, oldest first (for tailing)."""
        where, params = self._filters(hub, device_id, extra="seq > ?", extra_params=(seq,))
        rows = self._db.query(
            f"SELECT * FROM hub_messages {where} ORDER BY seq ASC LIMIT ?",  # noqa: S608 - fixed fragments
            (*params, limit),
        )
        return [_from_row(row) for row in rows]

    def last_seq(self) -> int:
        row = self._db.query_one(
            f"SELECT COALESCE(MAX(seq), 0) AS seq FROM hub_messages WHERE source = '{TELEMETRY}'"  # noqa: S608
        )
        return int(row["seq"]) if row else 0

    @staticmethod
    def _filters(
        hub: str | None,
        device_id: str | None,
        extra: str | None = None,
        extra_params: tuple[object, ...] = (),
    ) -> tuple[str, tuple[object, ...]]:
        clauses: list[str] = [f"source = '{TELEMETRY}'"]
        params: list[Any] = []
        if hub is not None:
            clauses.append("hub = ?")
            params.append(hub)
        if device_id is not None:
            clauses.append("device_id = ?")
            params.append(device_id)
        if extra:
            clauses.append(extra)
            params.extend(extra_params)
        return "WHERE " + " AND ".join(clauses), tuple(params)
