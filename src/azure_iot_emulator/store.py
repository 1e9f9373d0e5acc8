"""The emulator's one SQLite database.

Every part of the emulator (DPS, IoT Hub, MQTT sessions, telemetry) keeps its state in one file in the
data directory, so a restart keeps everything and a write that touches two parts (a DPS registration
that creates the hub identity) is one transaction.  Each part declares its tables with
:func:`Database.register_schema`; the statements must be idempotent (``CREATE TABLE IF NOT EXISTS``).

Access is synchronous: each statement is a local file operation of microseconds, done on the event loop
between awaits, which keeps transactions simple and never interleaved.  Commits are durable
(``synchronous=FULL``): what the emulator has acknowledged -- a PUBACK'd message, a 200 to a REST write --
survives a power cut as it would in Azure, not only a crash of the process.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
)


class Database:
    """One SQLite connection with explicit transactions."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        for pragma in _PRAGMAS:
            self._conn.execute(pragma)
        self._depth = 0

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
        if self._depth:
            self._depth += 1
            try:
                yield self._conn
            finally:
                self._depth -= 1
            return
        self._conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self._conn
        except BaseException:
            self._depth = 0
            self._conn.execute("ROLLBACK")
            raise
        self._depth = 0
        self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple | dict = ()) -> sqlite3.Row | None:
        return self._conn.execute(sql, params).fetchone()

    def close(self) -> None:
        self._conn.close()
