"""litestore's Store and group commit, on real files: whole-or-nothing transactions, one thread per store
used by many tasks at once, and a group whose commit fails fails every one of its writers."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from litestore import (
    GroupCommit,
    GroupedWrites,
    Options,
    Schema,
    Store,
    StoreClosed,
    Synchronous,
    transaction,
)

# Deferred: a row may point at a missing parent until COMMIT, which then fails (a real failing commit).
SCHEMA = Schema(
    "test",
    (
        """
        CREATE TABLE parents (id INTEGER PRIMARY KEY);
        CREATE TABLE children (
            id INTEGER PRIMARY KEY,
            parent INTEGER REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED
        );
        CREATE TABLE counter (value INTEGER NOT NULL);
        INSERT INTO counter VALUES (0);
        """,
    ),
)
OPTIONS = Options(synchronous=Synchronous.FULL)


def write_parents(db: sqlite3.Connection, ids: list[int]) -> list[int]:
    """A group writer: one parent row per item; a group holding 13 raises."""
    db.executemany("INSERT INTO parents (id) VALUES (?)", [(i,) for i in ids])
    if 13 in ids:
        raise LookupError("unlucky group")
    return ids


def committed(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as fresh:  # another connection sees only what was committed
        return fresh.execute(sql).fetchall()


async def test_a_transaction_that_raises_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = await Store.open(path, SCHEMA, OPTIONS)

    def half_then_fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO parents (id) VALUES (1), (2)")
        db.execute("UPDATE counter SET value = 99")
        raise ValueError("changed my mind")

    try:
        with pytest.raises(ValueError, match="changed my mind"):
            await store.transaction(half_then_fail)
        assert await store.run(lambda db: db.in_transaction) is False
        assert committed(path, "SELECT COUNT(*) FROM parents") == [(0,)]
        assert committed(path, "SELECT value FROM counter") == [(0,)]
        await store.transaction(lambda db: db.execute("INSERT INTO parents (id) VALUES (3)"))
        assert committed(path, "SELECT id FROM parents") == [(3,)]
    finally:
        await store.close()


async def test_a_failing_commit_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = await Store.open(path, SCHEMA, OPTIONS)

    def orphan(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO parents (id) VALUES (1)")
        db.execute("INSERT INTO children (id, parent) VALUES (1, 42)")  # checked only at COMMIT

    try:
        with pytest.raises(sqlite3.IntegrityError):
            await store.transaction(orphan)
        assert await store.run(lambda db: db.in_transaction) is False
        assert committed(path, "SELECT COUNT(*) FROM parents") == [(0,)]
    finally:
        await store.close()


def test_a_nested_transaction_joins_the_outer_one(tmp_path: Path) -> None:
    from litestore import connect

    db = connect(tmp_path / "t.db", SCHEMA, OPTIONS)
    try:
        with pytest.raises(RuntimeError), transaction(db):
            with transaction(db):
                db.execute("INSERT INTO parents (id) VALUES (1)")
            raise RuntimeError("the outer part failed")
        assert db.execute("SELECT COUNT(*) FROM parents").fetchone() == (0,)
    finally:
        db.close()


async def test_many_tasks_share_the_store_thread(tmp_path: Path) -> None:
    """Read-modify-write transactions from many tasks at once never interleave, and every call runs on the
    store's own thread (neither the event loop's nor the default executor's)."""
    path = tmp_path / "t.db"
    store = await Store.open(path, SCHEMA, OPTIONS)
    writes = GroupedWrites(store)
    threads: set[str] = set()

    def increment(db: sqlite3.Connection) -> int:
        threads.add(threading.current_thread().name)
        (value,) = db.execute("SELECT value FROM counter").fetchone()
        db.execute("UPDATE counter SET value = ?", (value + 1,))
        return value + 1

    async def worker(n: int) -> list[int]:
        seen = []
        for i in range(n):
            run = store.transaction if i % 2 else writes.run
            seen.append(await run(increment))
            await asyncio.sleep(0)
        return seen

    try:
        results = await asyncio.gather(*(worker(10) for _ in range(40)))
    finally:
        await store.close()
    assert sorted(v for seen in results for v in seen) == list(range(1, 401))  # no increment lost or doubled
    assert committed(path, "SELECT value FROM counter") == [(400,)]
    assert len(threads) == 1
    (name,) = threads
    assert name.startswith("store-test") and name != threading.main_thread().name
    assert writes.commits < 200  # the grouped half shared commits


async def test_a_failing_group_commit_fails_every_writer_of_the_group(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = await Store.open(path, SCHEMA, OPTIONS)
    writes = GroupedWrites(store)

    def parent(n: int):
        return lambda db: db.execute("INSERT INTO parents (id) VALUES (?)", (n,)).lastrowid

    def orphan(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO children (id, parent) VALUES (1, 999)")  # fine until the group's COMMIT

    def broken(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO parents (id) VALUES (77)")
        raise KeyError("this item alone")

    try:
        results = await asyncio.gather(
            writes.run(parent(1)), writes.run(orphan), writes.run(parent(2)), return_exceptions=True
        )
        assert all(isinstance(r, sqlite3.IntegrityError) for r in results), results
        assert writes.commits == 0
        assert committed(path, "SELECT COUNT(*) FROM parents") == [(0,)]

        # The next group is not affected; an item that raises on its own fails alone.
        results = await asyncio.gather(
            writes.run(parent(3)), writes.run(broken), writes.run(parent(4)), return_exceptions=True
        )
        assert results[0] == 3 and results[2] == 4 and isinstance(results[1], KeyError)
        assert writes.commits == 1
        assert committed(path, "SELECT id FROM parents ORDER BY id") == [(3,), (4,)]
    finally:
        await store.close()


async def test_a_group_writer_that_raises_fails_the_whole_group(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = await Store.open(path, SCHEMA, OPTIONS)

    group: GroupCommit[int, int] = GroupCommit(store, write_parents)
    try:
        results = await asyncio.gather(*(group.submit(i) for i in (11, 12, 13)), return_exceptions=True)
        assert all(isinstance(r, LookupError) for r in results)
        assert await asyncio.gather(group.submit(21), group.submit(22)) == [21, 22]
        assert committed(path, "SELECT id FROM parents ORDER BY id") == [(21,), (22,)]
    finally:
        await store.close()


async def test_close_waits_for_queued_writes_then_refuses_more(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = await Store.open(path, SCHEMA, OPTIONS)
    writes = GroupedWrites(store)
    pending = [
        asyncio.ensure_future(writes.run(lambda db, i=i: db.execute("INSERT INTO parents VALUES (?)", (i,))))
        for i in range(20)
    ]
    await asyncio.sleep(0)
    await store.close()
    assert all(task.done() and task.exception() is None for task in pending)
    assert committed(path, "SELECT COUNT(*) FROM parents") == [(20,)]
    with pytest.raises(StoreClosed):
        await store.run(lambda db: db.execute("SELECT 1"))


async def test_a_gathering_group_waits_for_as_many_writers_as_the_last_one_had(tmp_path: Path) -> None:
    """With ``gather``, after a group of several the next group waits for as many writers (never for the
    whole ``gather``, an hour here: the test would time out); a lone writer after a lone one never waits;
    each writer is answered only once its item is committed, and a failing gathered group fails all."""
    path = tmp_path / "t.db"
    store = await Store.open(path, SCHEMA, OPTIONS)

    group: GroupCommit[int, int] = GroupCommit(store, write_parents, gather=3600)
    try:
        assert await group.submit(1) == 1  # alone after nothing: at once
        assert await group.submit(2) == 2  # alone after a lone one: at once
        assert await asyncio.gather(group.submit(3), group.submit(4), group.submit(5)) == [3, 4, 5]
        assert group.commits == 3

        first = asyncio.ensure_future(group.submit(6))
        for _ in range(3):  # every callback due has run: without gathering, 6 would be handed to the thread
            await asyncio.sleep(0)
        await store.run(lambda db: None)  # the thread has done everything handed to it before this
        assert not first.done()
        assert committed(path, "SELECT id FROM parents WHERE id = 6") == []
        rest = asyncio.gather(group.submit(7), group.submit(8))  # three are in: the group starts
        assert [await first, *await rest] == [6, 7, 8]
        assert group.commits == 4  # 6, 7 and 8 in one commit
        assert committed(path, "SELECT id FROM parents WHERE id >= 6") == [(6,), (7,), (8,)]

        results = await asyncio.gather(*(group.submit(i) for i in (11, 12, 13)), return_exceptions=True)
        assert all(isinstance(r, LookupError) for r in results)
        assert committed(path, "SELECT COUNT(*) FROM parents WHERE id > 10") == [(0,)]
    finally:
        await store.close()
