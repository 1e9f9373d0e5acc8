"""The SQLite backend: litestore's store (one file, one thread), a transaction's work run there at once.

The work is an ``async`` function of the :class:`Tx`, but on SQLite nothing in it suspends: every
:class:`SqliteTx` call runs the statement right away on the store's thread.  So the whole coroutine is
driven to its end on that thread in one step (:func:`run_now`), exactly as a plain function of the
connection was before; work that awaits anything else is a programming error, reported as such.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from dbstore.port import Backend, Conflict, GroupWork, Params, Row, Work
from litestore import GroupCommit, Options, Schema, Store

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - the item type of a group commit
R = TypeVar("R")


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends to its result (on the calling thread)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("SQLite work suspended: a store's work may await only its transaction (Tx)")


class SqliteTx:
    backend = Backend.SQLITE

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._depth = 0

    def _run(self, sql: str, params: Params) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, tuple(params))
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from exc

    async def execute(self, sql: str, params: Params = ()) -> int:
        return self._run(sql, params).rowcount

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        row = self._run(sql, params).fetchone()
        return None if row is None else tuple(row)

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return [tuple(row) for row in self._run(sql, params).fetchall()]

    async def insert(self, sql: str, params: Params, key: str) -> int:
        return int(self._run(sql, params).lastrowid or 0)

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        self._depth += 1
        name = f"sp{self._depth}"
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")
            raise
        else:
            self.conn.execute(f"RELEASE {name}")
        finally:
            self._depth -= 1


class SqliteDatabase:
    backend = Backend.SQLITE
    shared = False  # one process: litestore's single writer thread orders every write

    def __init__(self, store: Store) -> None:
        self.store = store
        self.name = store.name
        self.path = store.path

    @classmethod
    async def open(cls, path: Path, schema: Schema, options: Options) -> SqliteDatabase:
        return cls(await Store.open(path, schema, options))

    async def transaction(self, work: Work[T]) -> T:
        return await self.store.transaction(lambda conn: run_now(work(SqliteTx(conn))))

    async def read(self, work: Work[T]) -> T:
        return await self.store.run(lambda conn: run_now(work(SqliteTx(conn))))

    def group_commit(self, work: GroupWork[I, R], *, gather: float = 0.0) -> GroupCommit[I, R]:
        """litestore's group commit: the group's work runs on the store's thread in one transaction."""

        def write(conn: sqlite3.Connection, items: list[I]) -> list[R]:
            return run_now(work(SqliteTx(conn), items))

        return GroupCommit(self.store, write, gather=gather)

    async def compact_log(self) -> None:
        # Read the pragma's result row: an unread one leaves its statement open, and the next COMMIT fails.
        await self.store.run(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())

    async def close(self) -> None:
        await self.store.close()
