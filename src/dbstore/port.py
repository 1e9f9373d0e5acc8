"""The storage port: a transaction (:class:`Tx`) and a database (:class:`Database`), two backends."""

from __future__ import annotations

import enum
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - the item type of a group commit
R = TypeVar("R")
I_contra = TypeVar("I_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)
Row = tuple[Any, ...]
Params = Sequence[object]


class Backend(enum.Enum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


class Conflict(Exception):
    """A write broke a unique key or a reference (the other backend's integrity error, one name for both).
    On PostgreSQL it also spoils the transaction: catch it only around a :meth:`Tx.savepoint`."""


class RunAgain(Exception):
    """The database gave this transaction up (PostgreSQL: a deadlock's victim, a serialization failure):
    nothing of it stays, and :meth:`Database.transaction` runs it again from the start.  Never caught inside
    a transaction's work, not even around a :meth:`Tx.savepoint`: the whole transaction is run again."""


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
# A group's work: the items that arrived together, written in one transaction; one result per item, in order.
GroupWork = Callable[[Tx, list[I]], Coroutine[Any, Any, list[R]]]


class GroupWriter(Protocol[I_contra, R_co]):
    """Writes that arrive together, committed together (see :meth:`Database.group_commit`)."""

    @property
    def commits(self) -> int:
        """Groups committed so far (for tests and metrics)."""
        ...

    async def submit(self, item: I_contra) -> R_co:
        """``item``'s result, once the commit that holds it has completed (a failed commit fails every item
        of its group, and none of the group's writes stays)."""
        ...


class Database(Protocol):
    """A store's database.  Stores ask what it can do (``shared``, ``compact_log``, ``group_commit``), never
    which backend it is; only the SQL of a statement may differ by ``Tx.backend`` (``FOR UPDATE``,
    ``SKIP LOCKED``)."""

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

    def group_commit(self, work: GroupWork[I, R], *, gather: float = 0.0) -> GroupWriter[I, R] | None:
        """Items submitted together are written by one ``work(tx, items)`` in one transaction, one commit
        for the group (SQLite: on the store's thread, where one writer orders every write; PostgreSQL: the
        items of this process, ``dbstore.grouped``); ``gather`` (seconds): while writers come together, how
        long a group may wait for as many as the last one had.  ``work`` awaits only its ``tx`` (and may be
        run again from the start after a deadlock).  None where a backend cannot group: each write is then
        its own transaction."""
        ...

    async def transaction(self, work: Work[T]) -> T:
        """``work(tx)`` as one transaction: all of it committed, or nothing when it (or the commit) raises."""
        ...

    async def read(self, work: Work[T]) -> T:
        """``work(tx)`` without a transaction of its own (each statement on its own): for reads, and on
        PostgreSQL for writes each of which stands alone (``dbstore.reservations``)."""
        ...

    async def close(self) -> None: ...
