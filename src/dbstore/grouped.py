"""Transactions that share a commit where the database has one writer: ``GroupedTransactions(db)``.

``await grouped.run(work)`` runs ``work(tx)`` as a transaction of its own as far as its caller can tell:
all of it written or none of it, answered only once it is durable, its exception raised to its caller
alone.  Where the database orders every write behind one writer (SQLite: :meth:`Database.group_commit`),
the works that arrive while a commit is under way are written together in the next transaction, each in
its own savepoint (one that raises leaves nothing and fails alone), one commit (one fsync) for all of
them; a failed commit fails every work of its group, and none of them stays.  Elsewhere (a shared server
database) each work is its own transaction (:meth:`Database.transaction`).

A work must not depend on another of the same group being absent: it may see the writes of the works
before it in its group (committed together), as it would see them had they committed first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar, cast

from dbstore.port import Database, GroupWriter, Tx, Work

T = TypeVar("T")


@dataclass(frozen=True)
class _Raised:
    """A grouped work that raised: re-raised to its own caller only."""

    error: Exception


async def _each_alone(tx: Tx, works: list[Work[Any]]) -> list[Any]:
    """A group of works, each in its own savepoint: one that raises leaves nothing and fails alone."""
    results: list[Any] = []
    for work in works:
        try:
            async with tx.savepoint():
                results.append(await work(tx))
        except Exception as exc:  # handed to the work's own caller
            results.append(_Raised(exc))
    return results


class GroupedTransactions:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._group: GroupWriter[Work[Any], Any] | None = db.group_commit(_each_alone)

    @property
    def commits(self) -> int | None:
        """Group commits so far (None where each work is its own transaction)."""
        return None if self._group is None else self._group.commits

    async def run(self, work: Work[T]) -> T:
        """``work(tx)`` in a transaction: its group's, where writes are grouped, else its own."""
        if self._group is None:
            return await self._db.transaction(work)
        result = await self._group.submit(work)
        if isinstance(result, _Raised):
            raise result.error
        return cast(T, result)
