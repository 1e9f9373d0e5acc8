"""Bounded, persisted telemetry outbox (SQLite).

Every message is written here before it is sent and deleted only after the hub acknowledged it, so
messages survive outages and restarts and leave in production order.  When the bound is reached the
oldest messages are dropped and counted.  The sequence counter lives in the same database, so sequence
numbers keep increasing across restarts and never repeat.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from device_client.errors import StateError

_BodyFactory = Callable[[int], tuple[str, datetime, bytes]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq         INTEGER PRIMARY KEY,
    message_id  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    body        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name   TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('next_seq', 1), ('dropped', 0), ('sent', 0);
"""


@dataclass(frozen=True)
class BufferedMessage:
    seq: int
    message_id: str
    created_at: datetime
    body: bytes


@dataclass(frozen=True)
class BufferStats:
    pending: int
    dropped: int
    sent: int
    next_seq: int
    oldest_seq: int | None
    capacity: int


class TelemetryBuffer:
    """The outbox of one device.  Not thread-safe: use it from one thread (the device's event loop)."""

    def __init__(self, path: Path, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("buffer capacity must be at least 1")
        self.path = path
        self.capacity = capacity
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            # A concentrator loses power: a produced message must survive that too, not only a crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"{path}: telemetry buffer is not a usable SQLite database ({exc})", "BUFFER_CORRUPTED"
            ) from exc

    def close(self) -> None:
        self._db.close()

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0])

    def append(self, make_body: _BodyFactory) -> BufferedMessage:
        """Allocate the next sequence number, build the message with it and store it, in one transaction.

        ``make_body(seq) -> (message_id, created_at, body)``.  Drops the oldest messages if full.
        """
        with self._transaction():
            seq = self._counter("next_seq")
            message_id, created_at, body = make_body(seq)
            self._db.execute("UPDATE counters SET value = ? WHERE name = 'next_seq'", (seq + 1,))
            self._db.execute(
                "INSERT INTO outbox (seq, message_id, created_at, body) VALUES (?, ?, ?, ?)",
                (seq, message_id, created_at.isoformat(), body),
            )
            (pending,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            excess = pending - self.capacity
            if excess > 0:
                self._db.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)", (excess,)
                )
                self._db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (excess,))
        return BufferedMessage(seq, message_id, created_at, body)

    def peek(self, limit: int = 1) -> list[BufferedMessage]:
        rows = self._db.execute(
            "SELECT seq, message_id, created_at, body FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [BufferedMessage(r[0], r[1], datetime.fromisoformat(r[2]), bytes(r[3])) for r in rows]

    def acknowledge(self, seq: int) -> None:
        """The hub acknowledged ``seq``: remove it (a no-op if it was dropped meanwhile)."""
        with self._transaction():
            cur = self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            if cur.rowcount:
                self._db.execute("UPDATE counters SET value = value + 1 WHERE name = 'sent'")

    def stats(self) -> BufferStats:
        (pending,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        (oldest,) = self._db.execute("SELECT MIN(seq) FROM outbox").fetchone()
        return BufferStats(
            pending=int(pending),
            dropped=self._counter("dropped"),
            sent=self._counter("sent"),
            next_seq=self._counter("next_seq"),
            oldest_seq=oldest,
            capacity=self.capacity,
        )

    def _transaction(self) -> _Tx:
        return _Tx(self._db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
