"""An open database for asyncio code: one connection on one dedicated thread.

SQLite calls block (a commit with ``synchronous=FULL`` waits for the disk), and the event loop must not.
Each :class:`Store` owns one thread (not the loop's default executor, which other work shares and which
may run calls in parallel): every call on the connection runs there, one at a time, in the order asked.

:class:`GroupCommit` lets writes that arrive together share one transaction and so one commit (one
fsync): while a group is being written on the thread, new writes queue up and form the next group.  A
writer's ``submit`` answers only after the commit that holds its write has completed; when that commit
fails, every writer of the group gets the error, and none of the group's writes stays.  With ``gather``
(seconds), a group that follows a group of several writers waits until as many writers are in, or
``gather`` at most, before it is written: under load fewer, larger commits; a lone writer never waits.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from litestore.connection import Options, connect, transaction
from litestore.schema import Schema

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - the item type of a group commit
R = TypeVar("R")


class StoreClosed(RuntimeError):
    """The store was closed; no more calls are taken."""


class Store:
    """Open with :meth:`open`; close with :meth:`close` (waits for queued work, then closes the file)."""

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self._conn: sqlite3.Connection | None = conn
        self._executor = executor
        self._groups: list[GroupCommit[Any, Any]] = []

    @classmethod
    async def open(cls, path: Path, schema: Schema, options: Options) -> Store:
        """Connect and migrate on the store's own thread (see :func:`litestore.connect`)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"store-{schema.name}")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, connect, path, schema, options)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(conn, executor, path, schema.name)

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection; use it only from a function running on the store's thread."""
        if self._conn is None:
            raise StoreClosed(f"the {self.name} store is closed")
        return self._conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the store's thread and answer its result (or raise its exception)."""
        if self._conn is None:
            raise StoreClosed(f"the {self.name} store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the store's thread inside one transaction: committed as a whole when
        ``fn`` returns, rolled back as a whole when it (or the commit) raises."""

        def in_transaction(conn: sqlite3.Connection) -> T:
            with transaction(conn):
                return fn(conn)

        return await self.run(in_transaction)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return fn(self.connection)

    def _submit(self, fn: Callable[[], None]) -> None:
        """Queue ``fn()`` on the store's thread without waiting (for :class:`GroupCommit`)."""
        self._executor.submit(fn)

    async def close(self) -> None:
        for group in self._groups:
            await group.drain()

        def disconnect(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None

        if self._conn is not None:
            await self.run(disconnect)
        self._executor.shutdown(wait=True)


@dataclass(frozen=True)
class Failed:
    """One item of a group that failed on its own (its savepoint rolled back); the others go on."""

    error: BaseException


def each_in_savepoint(
    conn: sqlite3.Connection, items: list[Callable[[sqlite3.Connection], R]]
) -> list[R | Failed]:
    """A group writer for items that are functions of the connection: each runs in its own savepoint, so
    one that raises leaves nothing and fails alone."""
    results: list[R | Failed] = []
    for fn in items:
        conn.execute("SAVEPOINT item")
        try:
            result = fn(conn)
        except Exception as exc:
            conn.execute("ROLLBACK TO item")
            conn.execute("RELEASE item")
            results.append(Failed(exc))
            continue
        conn.execute("RELEASE item")
        results.append(result)
    return results


GATHER_ENOUGH = 64  # a group this big starts at once, gathering or not


@dataclass
class Waiting(Generic[I, R]):
    """An item of a group commit and the future its writer waits on (also ``dbstore.grouped``'s)."""

    item: I
    future: asyncio.Future[R]


class GroupCommit(Generic[I, R]):
    """Items submitted together are written by ``write(connection, items)`` in one transaction on the
    store's thread, one commit for the group.  ``write`` answers one result per item, in order (a
    :class:`Failed` for an item that failed alone); if it raises, or the commit fails, the transaction is
    rolled back and every item of the group fails with that error.

    One group costs one hand-off to the store's thread and one wake-up of the event loop, whatever its
    size: results come back in one ``call_soon_threadsafe``, not one future per item.  ``gather``: see
    the module's description (0, the default: a group starts as soon as the thread is free).
    """

    def __init__(
        self,
        store: Store,
        write: Callable[[sqlite3.Connection, list[I]], Sequence[R | Failed]],
        *,
        gather: float = 0.0,
    ) -> None:
        self._store = store
        self._write = write
        self._gather = gather
        self._last_size = 0  # of the last group handed to the thread
        self._gathering: asyncio.TimerHandle | None = None  # while a group waits for more writers
        self._pending: list[Waiting[I, R]] = []
        self._idle: asyncio.Future[None] | None = None  # set while a group is on its way
        self.commits = 0  # groups committed so far (for tests and metrics)
        store._groups.append(self)

    async def submit(self, item: I) -> R:
        """Answer ``item``'s result once the commit that holds it has completed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append(Waiting(item, future))
        if self._idle is None:
            self._idle = loop.create_future()
            self._schedule(loop)
        elif self._gathering is not None and not self._wait_for_more():
            self._gathering.cancel()
            self._gathering = None
            loop.call_soon(self._start, loop)
        return await future

    def _wait_for_more(self) -> bool:
        """While writers come together (the last group had several) and fewer than that many wait."""
        return self._last_size > 1 and len(self._pending) < min(self._last_size, GATHER_ENOUGH)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the next group after the callbacks already due (they may submit more).  With ``gather``,
        while writers come together, the group waits until as many writers as the last group had are in,
        or ``gather`` seconds at most: one writer alone, or writers that are all in, never wait."""
        if self._gather and self._wait_for_more():
            self._gathering = loop.call_later(self._gather, self._start, loop)
        else:
            loop.call_soon(self._start, loop)

    async def drain(self) -> None:
        """Wait until every submitted item is answered."""
        if self._idle is not None:
            await asyncio.shield(self._idle)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Event loop: hand everything pending to the store's thread as one group."""
        self._gathering = None
        group, self._pending = self._pending, []
        self._last_size = len(group)
        if not group:
            self._finished(group, [], None, loop)
            return
        try:
            self._store._submit(lambda: self._commit(group, loop))
        except BaseException as exc:  # the thread is shut down: nobody will write these
            self._finished(group, None, exc, loop)

    def _commit(self, group: list[Waiting[I, R]], loop: asyncio.AbstractEventLoop) -> None:
        """Store thread: write and commit the group, then report back to the event loop once."""
        results: Sequence[R | Failed] | None = None
        error: BaseException | None = None
        try:
            conn = self._store.connection
            with transaction(conn):
                results = self._write(conn, [waiting.item for waiting in group])
                if len(results) != len(group):
                    raise RuntimeError(f"group writer answered {len(results)} results for {len(group)} items")
        except BaseException as exc:
            results, error = None, exc
        loop.call_soon_threadsafe(self._finished, group, results, error, loop)

    def _finished(
        self,
        group: list[Waiting[I, R]],
        results: Sequence[R | Failed] | None,
        error: BaseException | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Event loop: answer the group's waiters, then start the group that gathered meanwhile."""
        if results is not None and group:
            self.commits += 1
        for index, waiting in enumerate(group):
            if waiting.future.done():  # its waiter was cancelled; the write stands all the same
                continue
            outcome = results[index] if results is not None else Failed(error or RuntimeError("write failed"))
            if isinstance(outcome, Failed):
                waiting.future.set_exception(outcome.error)
            else:
                waiting.future.set_result(outcome)
        if self._pending:
            self._schedule(loop)
        elif self._idle is not None:
            idle, self._idle = self._idle, None
            idle.set_result(None)


class GroupedWrites:
    """The usual group commit: each write is a function of the connection, run in its own savepoint inside
    the group's transaction (one that raises fails alone); :meth:`run` answers its result once the group is
    committed, or raises the group's error when the commit fails."""

    def __init__(self, store: Store) -> None:
        self._group: GroupCommit[Callable[[sqlite3.Connection], Any], Any]
        self._group = GroupCommit(store, each_in_savepoint)

    @property
    def commits(self) -> int:
        return self._group.commits

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return cast(T, await self._group.submit(fn))
