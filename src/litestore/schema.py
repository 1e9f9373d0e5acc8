"""An explicit schema version (``PRAGMA user_version``) and the ordered migrations that reach it.

A store declares its migrations once: migration ``n`` (counting from 1) brings a file from version
``n - 1`` to version ``n``, and the store's version is the number of migrations.  Opening a file runs the
migrations it lacks, all in one ``BEGIN IMMEDIATE`` transaction together with the new version number, so
a file is either migrated entirely or left as it was, and two processes opening the same old file do not
both migrate it.  A file whose version is newer than the program knows is refused: its tables may mean
something this program would misread.

A new file has version 0, and so does a file written before its store declared a version: the first
migration of such a store is its original ``CREATE TABLE IF NOT EXISTS`` script, harmless on both.
Later migrations must not be edited once released; add a new one instead.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# A migration: an SQL script (several statements; no BEGIN/COMMIT of its own) or a function of the connection.
Migration = str | Callable[[sqlite3.Connection], None]


class SchemaError(Exception):
    """A database file this program must not use as it is."""


class SchemaTooNew(SchemaError):
    """The file was written by a newer program (a schema version this program does not know)."""

    def __init__(self, path: Path | str, name: str, found: int, known: int) -> None:
        super().__init__(
            f"{path}: the {name} database has schema version {found}, newer than version {known} that this "
            f"program knows; refusing to open it (run the newer program, or move the file aside)"
        )
        self.path = path
        self.found = found
        self.known = known


@dataclass(frozen=True)
class Schema:
    """``name`` says what the file is in error messages ("ledger"); ``migrations`` are in order."""

    name: str
    migrations: Sequence[Migration]

    @property
    def version(self) -> int:
        return len(self.migrations)


def user_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    return int(version)


def statements(script: str) -> list[str]:
    """The statements of an SQL script, in order (``executescript`` would commit the open transaction)."""
    found, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):  # a ";" inside a trigger body or a string does not end one
            if pending.strip(" \t\r\n;"):
                found.append(pending.strip())
            pending = ""
    if pending.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {pending.strip()[:60]!r}")
    return found


def migrate(conn: sqlite3.Connection, schema: Schema, path: Path | str) -> int:
    """Bring the file to ``schema.version``; answer the version it had.  ``conn`` is in autocommit mode."""
    found = user_version(conn)
    if found > schema.version:
        raise SchemaTooNew(path, schema.name, found, schema.version)
    if found == schema.version:
        return found
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = user_version(conn)  # another process may have migrated it before we held the lock
        if found > schema.version:
            raise SchemaTooNew(path, schema.name, found, schema.version)
        for step in schema.migrations[found:]:
            if isinstance(step, str):
                for statement in statements(step):
                    conn.execute(statement)
            else:
                step(conn)
        conn.execute(f"PRAGMA user_version = {int(schema.version)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return found
