"""Group commit on both backends (``Database.group_commit``): writes submitted together share one transaction;
each writer is answered only after the commit holding its write; a group whose commit fails (here a deferred
foreign key checked at COMMIT) or whose work raises fails every writer of the group and leaves none of its
writes, and the next group goes on."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from dbstore import Database, DatabaseUrl, Tx, open_database
from dbstore.grouped import GroupedTransactions
from dbstore.port import GroupWriter
from litestore import Options, Schema, Synchronous

SCHEMA = """
CREATE TABLE parents (id INTEGER PRIMARY KEY);
CREATE TABLE children (
    name TEXT PRIMARY KEY,
    parent INTEGER NOT NULL REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED
);
INSERT INTO parents (id) VALUES (1);
"""


async def _open(url: DatabaseUrl) -> Database:
    schema = Schema("groups", (SCHEMA,))
    options = Options(synchronous=Synchronous.FULL)
    return await open_database(url, "groups.sqlite3", schema, options, migrate=True)


async def _write(tx: Tx, items: list[tuple[str, int]]) -> list[str]:
    for name, parent in items:
        if name == "boom":
            raise RuntimeError("the group's work failed")
        await tx.execute("INSERT INTO children (name, parent) VALUES (?, ?)", (name, parent))
    return [f"stored {name}" for name, _ in items]


async def _names(db: Database) -> list[str]:
    rows = await db.read(lambda tx: tx.fetchall("SELECT name FROM children ORDER BY name"))
    return [str(r[0]) for r in rows]


@contextlib.asynccontextmanager
async def _grouped(url: DatabaseUrl) -> AsyncIterator[tuple[Database, GroupWriter[tuple[str, int], str]]]:
    """The database and its group writer of ``_write`` (closed on leaving)."""
    db = await _open(url)
    try:
        writer = db.group_commit(_write)
        assert writer is not None
        yield db, writer
    finally:
        await db.close()


async def _outcomes(writer, items: list[tuple[str, int]]) -> list[object]:
    return await asyncio.gather(*(writer.submit(item) for item in items), return_exceptions=True)


async def test_writes_submitted_together_share_one_commit(database_url):
    async with _grouped(database_url) as (db, writer):
        answers = await _outcomes(writer, [(f"c{k}", 1) for k in range(20)])
        assert answers == [f"stored c{k}" for k in range(20)]
        assert writer.commits == 1
        assert await _names(db) == sorted(f"c{k}" for k in range(20))


@pytest.mark.parametrize("failing", [("orphan", 99), ("boom", 1)], ids=["commit-fails", "work-raises"])
async def test_a_failed_group_fails_every_writer_and_keeps_nothing(database_url, failing):
    async with _grouped(database_url) as (db, writer):
        items = [("a", 1), ("b", 1), failing, ("c", 1)]
        answers = await _outcomes(writer, items)
        assert all(isinstance(answer, Exception) for answer in answers), answers
        assert len({id(answer) for answer in answers}) == 1  # the group's one error, given to each writer
        assert writer.commits == 0
        assert await _names(db) == []
        # the next group is a group of its own, and commits
        assert await _outcomes(writer, [("a", 1), ("d", 1)]) == ["stored a", "stored d"]
        assert writer.commits == 1
        assert await _names(db) == ["a", "d"]


async def test_writes_arriving_during_a_commit_form_the_next_group(database_url):
    async with _grouped(database_url) as (_db, writer):
        first = asyncio.ensure_future(writer.submit(("first", 1)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first group is on its way
        rest = await _outcomes(writer, [(f"n{k}", 1) for k in range(5)])
        assert [await first, *rest] == ["stored first", *(f"stored n{k}" for k in range(5))]
        assert writer.commits == 2


async def test_a_cancelled_writer_does_not_undo_its_group(database_url):
    db = await _open(database_url)
    try:
        writer = db.group_commit(_write)
        assert writer is not None
        gone = asyncio.ensure_future(writer.submit(("gone", 1)))
        kept = asyncio.ensure_future(writer.submit(("kept", 1)))
        await asyncio.sleep(0)
        gone.cancel()
        assert await kept == "stored kept"
        await db.close()  # drains: every submitted write is settled first
        db = await _open(database_url)
        assert await _names(db) == ["gone", "kept"]
    finally:
        await db.close()


async def test_a_grouped_work_the_database_gives_up_is_run_again_with_its_group(postgres_url):
    """PostgreSQL ends a transaction it picks as a deadlock's victim (here the server raises that very error,
    SQLSTATE 40P01, in one work of a group): the group is run again from the start, as a transaction of its
    own would be, and every caller gets its answer, each write committed once."""
    db = await _open(DatabaseUrl.parse(postgres_url))
    try:
        grouped = GroupedTransactions(db)
        attempts: Counter[str] = Counter()

        def child(name: str) -> Callable[[Tx], Awaitable[str]]:
            async def work(tx: Tx) -> str:
                attempts[name] += 1
                await tx.execute("INSERT INTO children (name, parent) VALUES (?, 1)", (name,))
                if name == "victim" and attempts[name] == 1:
                    await tx.execute(
                        "DO $$ BEGIN RAISE EXCEPTION 'the deadlock victim' "
                        "USING ERRCODE = 'deadlock_detected'; END $$"
                    )
                return f"stored {name}"

            return work

        answers = await asyncio.gather(*(grouped.run(child(n)) for n in ("a", "victim", "b")))
        assert answers == ["stored a", "stored victim", "stored b"]
        assert attempts["victim"] == 2 and grouped.commits == 1
        assert await _names(db) == ["a", "b", "victim"]
    finally:
        await db.close()
