"""The storage port: a transaction (:class:`Tx`) and a database (:class:`Database`), two backends."""

from __future__ import annotations

import enum
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
Row = tuple[Any, ...]
Params = Sequence[object]


class Backend(enum.Enum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


class Conflict(Exception):
    """A write broke a unique key or a reference (the other backend's integrity error, one name for both).
    On PostgreSQL it also spoils the transaction: catch it only around a :meth:`Tx.savepoint`."""


class Tx(Protocol):
    """One transaction (or, in :meth:`Database.read`, one connection without one).  SQL uses ``?``."""

    backend: Backend

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; answer the number of rows it changed."""
        ...

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None: ...

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]: ...

    async def insert(self, sql: str, params: Params, key: str) -> int:
        """Run one ``INSERT`` of one row; answer its generated ``key`` column."""
        ...

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """A nested transaction: an exception inside undoes only what was written inside, and goes on."""
        ...


Work = Callable[[Tx], Coroutine[Any, Any, T]]


class Database(Protocol):
    """A store's database.  Stores ask what it can do (``shared``, ``compact_log``), never which backend it
    is; only the SQL of a statement may differ by ``Tx.backend`` (``FOR UPDATE``, ``SKIP LOCKED``)."""

    backend: Backend
    name: str

    @property
    def shared(self) -> bool:
        """Whether several processes (replicas) use this database at once: a store then claims rows with
        row locks and holds work with leases.  False: one process, whose single writer orders all writes."""
        ...

    async def compact_log(self) -> None:
        """Give back the space of deleted rows in the write-ahead log, so that deleted secrets do not linger
        in a file (SQLite's WAL, truncated); nothing where the server manages its own log."""
        ...

    async def transaction(self, work: Work[T]) -> T:
        """``work(tx)`` as one transaction: all of it committed, or nothing when it (or the commit) raises."""
        ...

    async def read(self, work: Work[T]) -> T:
        """``work(tx)`` without a transaction of its own (each statement on its own): for reads, and on
        PostgreSQL for writes each of which stands alone (``dbstore.reservations``)."""
        ...

    async def close(self) -> None: ...

