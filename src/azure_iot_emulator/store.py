"""The emulator's one SQLite database.

Every part of the emulator (DPS, IoT Hub, MQTT sessions, telemetry) keeps its state in one file in the
data directory, so a restart keeps everything and a write that touches two parts (a DPS registration
that creates the hub identity) is one transaction.  Each part declares its tables with
:func:`Database.register_schema`; the statements must be idempotent (``CREATE TABLE IF NOT EXISTS``).

The file is opened through litestore (the standalone SQLite helper shared with the suite; the emulator
still imports nothing from the suite): mode 0600, WAL, a busy timeout, foreign keys, and an explicit
schema version.  Version 1 is the tables as the parts create them.  A change to a table that already
exists in released files (a new column, a new constraint) is a new entry of :data:`MIGRATIONS`, written to
work on an old file; the part's ``CREATE TABLE IF NOT EXISTS`` carries the new shape for fresh files, so
such a migration must also accept a file where the table does not exist yet.  A file from a newer emulator
is refused (:class:`litestore.SchemaTooNew`).

Access is synchronous: each statement is a local file operation of microseconds, done on the event loop
between awaits, which keeps transactions simple and never interleaved.  Commits are durable
(``synchronous=FULL``): what the emulator has acknowledged -- a PUBACK'd message, a 200 to a REST write --
survives a power cut as it would in Azure, not only a crash of the process.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path

import litestore


def _message_source(conn: sqlite3.Connection) -> None:
    """Version 2: ``hub_messages.source``, what produced a stored event (``Telemetry`` for device messages,
    ``twinChangeEvents``, ``deviceLifecycleEvents``... for the hub's own notifications).  A file without
    the table yet gets it, with the column, from the hub's own ``CREATE TABLE``."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'hub_messages'").fetchone():
        columns = {row[1] for row in conn.execute("PRAGMA table_info(hub_messages)")}
        if "source" not in columns:
            conn.execute("ALTER TABLE hub_messages ADD COLUMN source TEXT NOT NULL DEFAULT 'Telemetry'")


# Version 1: the parts' tables, created by the parts themselves (register_schema); nothing to migrate.
MIGRATIONS: tuple[litestore.Migration, ...] = ("", _message_source)
SCHEMA = litestore.Schema("emulator", MIGRATIONS)
Params = tuple[object, ...] | Mapping[str, object]  # SQL parameters, by position or by name
OPTIONS = litestore.Options(synchronous=litestore.Synchronous.FULL, row_factory=sqlite3.Row)


class Database:
    """One SQLite connection with explicit transactions."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._conn = litestore.connect(self.path, SCHEMA, OPTIONS)

    @property
    def connection(self) -> sqlite3.Connection:
        return self._conn

    def register_schema(self, *statements: str) -> None:
        """Create a part's tables and indexes (idempotent statements), atomically."""
        with self.transaction() as conn:
            for statement in statements:
                conn.execute(statement)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any exception.  Nested use joins the outer
        transaction, so a helper that writes can be called both alone and inside a bigger write."""
        with litestore.transaction(self._conn) as conn:
            yield conn

    def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()  # row_factory is sqlite3.Row
        return row

    def close(self) -> None:
        self._conn.close()
