"""Bounded, persisted telemetry outbox (SQLite).

Every message is written here before it is sent and deleted only after the hub acknowledged it, so
messages survive outages and restarts and leave in production order.  When the bound is reached the
oldest messages are dropped and counted.  The sequence counter lives in the same database, so sequence
numbers keep increasing across restarts and never repeat.

Several device runtimes may share one event loop, so no SQLite call runs on it: each buffer has its own
thread (litestore's :class:`~litestore.Store`), and writes that arrive together (appends and
acknowledgements of one buffer) share one transaction and one commit (group commit).  Durability is kept:
``append`` answers only after the commit holding its message has completed, with ``synchronous=FULL``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from device_client.errors import Reason, StateError
from litestore import GroupedWrites, Options, Schema, SchemaError, Store, Synchronous, connect

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

# Version 1 is the original schema (files written before versions were kept have version 0 and these tables).
SCHEMA = Schema("telemetry buffer", (_SCHEMA,))
# FULL: a concentrator loses power; a message reported as stored must survive that too, not only a crash.
OPTIONS = Options(synchronous=Synchronous.FULL)


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


def _unusable(path: Path, exc: Exception) -> StateError:
    if isinstance(exc, SchemaError):
        return StateError(str(exc), Reason.BUFFER_SCHEMA_UNKNOWN)
    return StateError(
        f"{path}: telemetry buffer is not a usable SQLite database ({exc})",
        Reason.BUFFER_CORRUPTED,
    )


def _check(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA quick_check").fetchone()


def _counter(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return int(row[0])


def _stats(db: sqlite3.Connection, capacity: int) -> BufferStats:
    (pending,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
    (oldest,) = db.execute("SELECT MIN(seq) FROM outbox").fetchone()
    return BufferStats(
        pending=int(pending),
        dropped=_counter(db, "dropped"),
        sent=_counter(db, "sent"),
        next_seq=_counter(db, "next_seq"),
        oldest_seq=oldest,
        capacity=capacity,
    )


def read_stats(path: Path, capacity: int) -> BufferStats:
    """The counters of a buffer file, read without a running device (for ``device-client status``)."""
    try:
        db = connect(path, SCHEMA, OPTIONS)
    except (sqlite3.DatabaseError, SchemaError) as exc:
        raise _unusable(path, exc) from exc
    try:
        return _stats(db, capacity)
    finally:
        db.close()


class TelemetryBuffer:
    """The outbox of one device.  Open with :meth:`open`; use it from one event loop."""

    def __init__(self, store: Store, capacity: int) -> None:
        self.path = store.path
        self.capacity = capacity
        self._store = store
        self._writes = GroupedWrites(store)

    @classmethod
    async def open(cls, path: Path, capacity: int) -> TelemetryBuffer:
        if capacity < 1:
            raise ValueError("buffer capacity must be at least 1")
        try:
            store = await Store.open(path, SCHEMA, OPTIONS)
        except (sqlite3.DatabaseError, SchemaError) as exc:
            raise _unusable(path, exc) from exc
        try:
            await store.run(_check)
        except sqlite3.DatabaseError as exc:
            await store.close()
            raise _unusable(path, exc) from exc
        return cls(store, capacity)

    async def close(self) -> None:
        await self._store.close()

    async def append(self, make_body: _BodyFactory) -> BufferedMessage:
        """Allocate the next sequence number, build the message with it and store it, in one transaction;
        answer once that transaction is committed.

        ``make_body(seq) -> (message_id, created_at, body)`` runs on the buffer's thread.  Drops the oldest
        messages if full.
        """
        capacity = self.capacity

        def write(db: sqlite3.Connection) -> BufferedMessage:
            seq = _counter(db, "next_seq")
            message_id, created_at, body = make_body(seq)
            db.execute("UPDATE counters SET value = ? WHERE name = 'next_seq'", (seq + 1,))
            db.execute(
                "INSERT INTO outbox (seq, message_id, created_at, body) VALUES (?, ?, ?, ?)",
                (seq, message_id, created_at.isoformat(), body),
            )
            (pending,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            excess = pending - capacity
            if excess > 0:
                db.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)", (excess,)
                )
                db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (excess,))
            return BufferedMessage(seq, message_id, created_at, body)

        return await self._writes.run(write)

    async def peek(self, limit: int = 1) -> list[BufferedMessage]:
        def read(db: sqlite3.Connection) -> list[BufferedMessage]:
            rows = db.execute(
                "SELECT seq, message_id, created_at, body FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            return [BufferedMessage(r[0], r[1], datetime.fromisoformat(r[2]), bytes(r[3])) for r in rows]

        return await self._store.run(read)

    async def acknowledge(self, seq: int) -> None:
        """The hub acknowledged ``seq``: remove it (a no-op if it was dropped meanwhile)."""

        def write(db: sqlite3.Connection) -> None:
            cur = db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            if cur.rowcount:
                db.execute("UPDATE counters SET value = value + 1 WHERE name = 'sent'")

        await self._writes.run(write)

    async def stats(self) -> BufferStats:
        capacity = self.capacity
        return await self._store.run(lambda db: _stats(db, capacity))
