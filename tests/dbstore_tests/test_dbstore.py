"""The storage port on both backends: transactions whole or absent, conflicts, generated keys, schema
versions (migrated from empty and from the previous version, a newer or older one refused)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from dbstore import Backend, Conflict, DatabaseUrl, Tx, UrlError, open_database
from dbstore.postgres import SchemaBehind
from litestore import Options, Schema, SchemaTooNew, Synchronous

V1 = """
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    at_us INTEGER NOT NULL
);
"""
V2 = "ALTER TABLE notes ADD COLUMN body TEXT NOT NULL DEFAULT '';"
OPTIONS = Options(synchronous=Synchronous.NORMAL)


async def _open(url: DatabaseUrl, migrations: tuple[str, ...]):
    return await open_database(url, "notes.sqlite3", Schema("notes", migrations), OPTIONS, migrate=True)


async def test_a_transaction_is_kept_whole_or_not_at_all(database_url):
    db = await _open(database_url, (V1, V2))
    try:

        async def add(tx: Tx) -> int:
            return await tx.insert("INSERT INTO notes (name, at_us) VALUES (?, ?)", ("a", 2**40), "id")

        first = await db.transaction(add)

        async def add_then_fail(tx: Tx) -> None:
            await tx.insert("INSERT INTO notes (name, at_us) VALUES (?, ?)", ("b", 1), "id")
            raise RuntimeError("changed my mind")

        with pytest.raises(RuntimeError):
            await db.transaction(add_then_fail)
        with pytest.raises(Conflict):
            await db.transaction(add)

        async def conflict_in_savepoint(tx: Tx) -> str:
            await tx.execute("UPDATE notes SET body = ? WHERE id = ?", ("100% kept", first))
            try:
                async with tx.savepoint():
                    await tx.execute("INSERT INTO notes (name, at_us) VALUES (?, ?)", ("a", 3))
            except Conflict:
                return "conflict"
            return "no conflict"

        assert await db.transaction(conflict_in_savepoint) == "conflict"

        async def rows(tx: Tx) -> list[tuple]:
            return await tx.fetchall("SELECT id, name, at_us, body FROM notes ORDER BY id")

        assert await db.read(rows) == [(first, "a", 2**40, "100% kept")]
    finally:
        await db.close()


async def test_migrations_from_empty_and_from_the_previous_version(database_url):
    db = await _open(database_url, (V1,))

    async def add(tx: Tx) -> None:
        await tx.execute("INSERT INTO notes (name, at_us) VALUES (?, ?)", ("old", 5))

    await db.transaction(add)
    await db.close()
    db = await _open(database_url, (V1, V2))
    try:
        kept = await db.read(lambda tx: tx.fetchall("SELECT name, at_us, body FROM notes"))
        assert kept == [("old", 5, "")]
    finally:
        await db.close()
    with pytest.raises(SchemaTooNew) as newer:
        await _open(database_url, (V1,))
    assert newer.value.found == 2 and newer.value.known == 1


async def test_postgresql_checks_the_version_at_start_up_and_migrates_only_when_asked(postgres_url):
    url = DatabaseUrl.parse(postgres_url)
    with pytest.raises(SchemaBehind) as behind:
        await open_database(url, "", Schema("notes", (V1,)), OPTIONS)
    assert "migrate" in str(behind.value) and behind.value.found == 0
    password = urlsplit(postgres_url).password
    assert password and password not in str(behind.value) and url.redacted() in str(behind.value)
    await (await _open(url, (V1,))).close()
    db = await open_database(url, "", Schema("notes", (V1,)), OPTIONS)
    assert db.backend is Backend.POSTGRESQL
    await db.close()
    with pytest.raises(SchemaBehind):
        await open_database(url, "", Schema("notes", (V1, V2)), OPTIONS)


def test_database_urls():
    assert DatabaseUrl.parse("sqlite:///var/lib/factory").directory.as_posix() == "/var/lib/factory"
    pg = DatabaseUrl.parse("postgresql://app:s3cret@db.example:5433/factory")
    assert pg.backend is Backend.POSTGRESQL and pg.redacted() == "postgresql://app:***@db.example:5433/factory"
    for bad in ("sqlite://relative", "mysql://x/y", "postgresql:///nohost", "postgresql://host"):
        with pytest.raises(UrlError):
            DatabaseUrl.parse(bad)
