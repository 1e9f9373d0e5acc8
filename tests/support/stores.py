"""Helpers for the store tests that run on both backends (the ``database_url`` fixture)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import psycopg

from dbstore import Backend, DatabaseUrl, open_database
from litestore import Migration, Options, Schema, Synchronous


async def write_at_version(
    url: DatabaseUrl, file: str, name: str, migrations: Sequence[Migration], statements: Sequence[str]
) -> None:
    """Create the store ``name`` at the version its first ``migrations`` reach (as a previous release
    left it) and run ``statements`` on it."""
    db = await open_database(url, file, Schema(name, migrations), Options(Synchronous.NORMAL), migrate=True)

    async def go(tx) -> None:
        for statement in statements:
            await tx.execute(statement)

    try:
        await db.transaction(go)
    finally:
        await db.close()


def stored_version(url: DatabaseUrl, file: str, name: str) -> int:
    """The schema version the store ``name`` has in the database."""
    if url.backend is Backend.SQLITE:
        assert url.directory is not None
        with sqlite3.connect(url.directory / file) as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
    with psycopg.connect(url.dsn) as conn:
        row = conn.execute("SELECT version FROM schema_versions WHERE store = %s", (name,)).fetchone()
    return int(row[0]) if row else 0
