"""Group commit for a database reached over the network (PostgreSQL): writes that arrive together share one
transaction, so one commit (one round trip to BEGIN, one to COMMIT, one WAL flush) serves many.

:class:`TransactionGroups` keeps the items submitted while a group is being written; when that group is done
they form the next one, written by one ``work(tx, items)`` in one transaction (:meth:`Database.transaction`,
which runs the work again from the start after a deadlock or serialization failure).  The promise is
litestore's (:class:`litestore.GroupCommit`): a writer's :meth:`~TransactionGroups.submit` answers only after
the commit that holds its item has completed; if the work raises or the commit fails, every item of the
group gets that error and none of the group's writes stays (a :class:`litestore.Failed` result fails its one
item alone, inside a group that commits).  Where a commit's outcome is unknown (the connection broke during
COMMIT) nobody is answered as if committed either: the error goes to every item, and a retry of a request
with an id finds what did commit.

The same queue serves statements that need no transaction around them but gain from going out together:
given :meth:`Database.read` instead of :meth:`Database.transaction`, each statement of the group's work
commits by itself (``dbstore.reservations``' claims).

The group is written by a task of its own, not by the first writer: a writer that is cancelled (its client
went away) neither cancels nor splits the transaction; its item's write stands or falls with the group.

``gather`` (seconds), as in litestore: while writers come together (the last group had several), a group
waits until as many writers as the last one had are in, or ``gather`` at most; a lone writer never waits.

:class:`GroupedTransactions` is the per-work face of group commit, on either backend: ``await
grouped.run(work)`` runs ``work(tx)`` as a transaction of its own as far as its caller can tell (all of it
written or none of it, answered only once it is durable, its exception raised to its caller alone), while
the works that arrive together share one transaction (:meth:`Database.group_commit`: SQLite's one writer,
or :class:`TransactionGroups` here), each in its own savepoint: one that raises leaves nothing and fails
alone (but a deadlock's victim is not a failure of its own: the group is run again from the start, as
one transaction would be); a failed commit fails every work of its group.  A work must not depend on
another of the same group being absent: it may see the writes of the works before it in its group, as it
would had they committed first; on PostgreSQL a group is run again from the start after a deadlock, so a
work touches only the database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from dbstore.port import Database, GroupWork, GroupWriter, RunAgain, Tx, Work
from litestore import Failed
from litestore.store import GATHER_ENOUGH, Waiting

I = TypeVar("I")  # noqa: E741 - the item type of a group commit
R = TypeVar("R")
T = TypeVar("T")

class TransactionGroups(Generic[I, R]):
    """Items submitted together, written by ``work`` in one ``transaction`` (or one ``Database.read``); see
    the module's description."""

    def __init__(
        self,
        transaction: Callable[[Work[list[R]]], Awaitable[list[R]]],
        work: GroupWork[I, R],
        *,
        gather: float = 0.0,
    ) -> None:
        self._transaction = transaction
        self._work = work
        self._gather = gather
        self._pending: list[Waiting[I, R]] = []
        self._writer: asyncio.Task[None] | None = None
        self._enough = asyncio.Event()  # set when the gathering group has as many writers as it waits for
        self._last_size = 0
        self.commits = 0  # groups committed so far (for tests and metrics)

    async def submit(self, item: I) -> R:
        """``item``'s result once the commit that holds it has completed (or the group's error)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(Waiting(item, future))
        if len(self._pending) >= self._wanted():
            self._enough.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_groups(), name="group-commit")
        return await future

    def _wanted(self) -> int:
        """How many writers a gathering group waits for (1: none, it starts at once)."""
        return min(self._last_size, GATHER_ENOUGH) if self._gather and self._last_size > 1 else 1

    async def _write_groups(self) -> None:
        """The writer task: one group after the other while items wait, then it ends."""
        try:
            while self._pending:
                if len(self._pending) < self._wanted():
                    self._enough.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._enough.wait(), self._gather)
                group, self._pending = self._pending, []
                self._last_size = len(group)
                await self._commit(group)
        finally:
            self._writer = None

    async def _commit(self, group: list[Waiting[I, R]]) -> None:
        items = [waiting.item for waiting in group]
        results: list[R] | None = None
        error: BaseException | None = None

        async def write(tx: Tx) -> list[R]:
            answered = await self._work(tx, items)
            if len(answered) != len(items):
                raise RuntimeError(f"group writer answered {len(answered)} results for {len(items)} items")
            return answered

        try:
            results = await self._transaction(write)
        except asyncio.CancelledError:  # the service is stopping: nobody of this group is answered as done
            error = RuntimeError("the group commit was cancelled")
            self._settle(group, None, error)
            raise
        except BaseException as exc:
            error = exc
        if results is not None:
            self.commits += 1
        self._settle(group, results, error)

    @staticmethod
    def _settle(
        group: list[Waiting[I, R]], results: Sequence[R] | None, error: BaseException | None
    ) -> None:
        for index, waiting in enumerate(group):
            if waiting.future.done():  # its writer was cancelled; the write stands or falls all the same
                continue
            outcome: R | Failed = (
                results[index] if results is not None else Failed(error or RuntimeError("write failed"))
            )
            if isinstance(outcome, Failed):
                waiting.future.set_exception(outcome.error)
            else:
                waiting.future.set_result(outcome)

    async def drain(self) -> None:
        """Wait until every submitted item is answered."""
        while self._writer is not None:
            await asyncio.shield(self._writer)


@dataclass(frozen=True)
class _Raised:
    """A grouped work that raised: re-raised to its own caller only."""

    error: Exception


async def _each_alone(tx: Tx, works: list[Work[Any]]) -> list[Any]:
    """A group of works, each in its own savepoint: one that raises leaves nothing and fails alone; one the
    database gave up (``RunAgain``) ends the group's transaction, which is run again from the start."""
    results: list[Any] = []
    for work in works:
        try:
            async with tx.savepoint():
                results.append(await work(tx))
        except RunAgain:
            raise
        except Exception as exc:  # handed to the work's own caller
            results.append(_Raised(exc))
    return results


class GroupedTransactions:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._group: GroupWriter[Work[Any], Any] | None = db.group_commit(_each_alone)

    @property
    def commits(self) -> int | None:
        """Group commits so far (None where the database has no group commit: each work alone)."""
        return None if self._group is None else self._group.commits

    async def run(self, work: Work[T]) -> T:
        """``work(tx)`` in a transaction: its group's, where writes are grouped, else its own."""
        if self._group is None:
            return await self._db.transaction(work)
        result = await self._group.submit(work)
        if isinstance(result, _Raised):
            raise result.error
        return cast(T, result)
