"""Request-id reservations: the rows that make replicas take turns on a request id (``provkit.idempotency``).

A store that keeps the answers of idempotent requests (a table ``answers(request_id PRIMARY KEY,
fingerprint, ...)``) adds a reservation table beside it (:func:`migration`, one name per store: replicas of
every service may share one PostgreSQL database) and answers through :class:`Reservations`:

- :meth:`Reservations.claim` inserts ``(request_id, fingerprint, holder, lease_until_us)``, then looks for
  an answer (in that order: an answer committed together with the deletion of an earlier reservation is
  seen by the second statement under ``READ COMMITTED``, so a request is never run again after its answer
  was stored).  It answers :class:`Claimed`: ``RESERVED`` (run it), ``TAKEN_OVER`` (the holder's lease ran
  out: run it, resuming whatever the holder left), ``ANSWERED``, ``REUSED`` (held for another fingerprint)
  or ``HELD`` (another replica runs it now: wait).
- the store deletes the reservation in the transaction that stores the answer (:func:`settle`), so
  "answer stored" and "reservation gone" are one commit;
- :meth:`Reservations.renew` extends a running holder's lease, :meth:`Reservations.release` drops it when
  the work failed (no answer: the next caller runs it).

Only a database several processes share needs them (:attr:`Reservations.shared`: PostgreSQL); a SQLite
file belongs to one process, whose per-process lock is enough, so nothing is written there.

Each statement here is safe on its own (an insert that does nothing on a conflict, a look, an update or
delete guarded by the holder and lease it read), so on PostgreSQL they run without a transaction around
them, each committed by itself (:meth:`Database.read`): two round trips for a new id instead of four.
Claims that arrive together share those two round trips (``dbstore.grouped``): one INSERT of all their
rows, then one look for answers to all of them (in that order, as for one); an id that was not inserted
(someone holds it) is claimed again on its own, by the full sequence above.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from dbstore.grouped import TransactionGroups
from dbstore.port import Database, Tx, Work

T = TypeVar("T")

_NAME = re.compile(r"^[a-z_]+$")


def migration(table: str) -> str:
    """The schema step that creates the reservation table ``table``."""
    return f"""
CREATE TABLE {_checked(table)} (
    request_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    holder TEXT NOT NULL,
    lease_until_us INTEGER NOT NULL
);
"""


def _checked(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"not a table name: {name!r}")
    return name


async def settle(tx: Tx, table: str, request_id: str) -> None:
    """Inside the transaction that stores ``request_id``'s answer: its reservation is over."""
    await tx.execute(f"DELETE FROM {_checked(table)} WHERE request_id = ?", (request_id,))  # noqa: S608


async def settle_many(tx: Tx, table: str, request_ids: list[str]) -> None:
    """:func:`settle` for several request ids at once (one statement)."""
    if request_ids:
        marks = ", ".join("?" * len(request_ids))
        await tx.execute(
            f"DELETE FROM {_checked(table)} WHERE request_id IN ({marks})",  # noqa: S608 - marks only
            request_ids,
        )


class ClaimKind(enum.Enum):
    RESERVED = "reserved"
    TAKEN_OVER = "taken-over"
    ANSWERED = "answered"
    REUSED = "reused"
    HELD = "held"


@dataclass(frozen=True)
class Claimed:
    kind: ClaimKind
    holder: str = ""  # HELD / TAKEN_OVER: who holds (held) it
    lease_until_us: int = 0


@dataclass(frozen=True)
class _Claim:
    request_id: str
    fingerprint: str
    holder: str
    now_us: int
    lease_until_us: int


_CLAIMS_PER_STATEMENT = 64


class Reservations:
    """The reservations of one store (``table``), beside its answers (``answers``)."""

    def __init__(self, db: Database, table: str, answers: str) -> None:
        self._db = db
        self.table = _checked(table)
        self._answers = _checked(answers)
        # Claims arriving together: one INSERT and one look for all of them (only where reservations are
        # written, each statement committed by itself).
        self._claims: TransactionGroups[_Claim, Claimed | None] | None = None
        if db.shared:
            self._claims = TransactionGroups(db.read, self._claim_together)

    async def _claim_together(self, tx: Tx, claims: list[_Claim]) -> list[Claimed | None]:
        """The claims of a group: RESERVED or ANSWERED for the ids this INSERT took; None (claim again,
        alone) for an id someone holds, or that came twice."""
        table, answers = self.table, self._answers
        inserted: set[str] = set()
        answered: set[str] = set()
        first = {c.request_id: c for c in reversed(claims)}  # an id twice: the first claims, the rest retry
        fresh = list(first.values())
        for start in range(0, len(fresh), _CLAIMS_PER_STATEMENT):
            part = fresh[start : start + _CLAIMS_PER_STATEMENT]
            rows = ", ".join(["(?, ?, ?, ?)"] * len(part))
            taken = await tx.fetchall(
                f"INSERT INTO {table} (request_id, fingerprint, holder, lease_until_us) "  # noqa: S608
                f"VALUES {rows} ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
                [v for c in part for v in (c.request_id, c.fingerprint, c.holder, c.lease_until_us)],
            )
            inserted.update(str(row[0]) for row in taken)
        ids = sorted(inserted)
        for start in range(0, len(ids), _CLAIMS_PER_STATEMENT):
            part_ids = ids[start : start + _CLAIMS_PER_STATEMENT]
            marks = ", ".join("?" * len(part_ids))
            found = await tx.fetchall(
                f"SELECT request_id FROM {answers} WHERE request_id IN ({marks})",  # noqa: S608 - marks only
                part_ids,
            )
            answered.update(str(row[0]) for row in found)
        if answered:
            await settle_many(tx, table, sorted(answered))
        out: list[Claimed | None] = []
        for claim in claims:
            if first[claim.request_id] is not claim or claim.request_id not in inserted:
                out.append(None)
            elif claim.request_id in answered:
                out.append(Claimed(ClaimKind.ANSWERED))
            else:
                out.append(Claimed(ClaimKind.RESERVED, claim.holder, claim.lease_until_us))
        return out

    @property
    def shared(self) -> bool:
        """Whether other processes use this database (then reservations are written)."""
        return self._db.shared

    async def claim(
        self, request_id: str, fingerprint: str, holder: str, now_us: int, lease_until_us: int
    ) -> Claimed:
        if self._claims is not None:
            claim = _Claim(request_id, fingerprint, holder, now_us, lease_until_us)
            claimed = await self._claims.submit(claim)
            if claimed is not None:
                return claimed
        table, answers = self.table, self._answers

        async def go(tx: Tx) -> Claimed:
            inserted = await tx.execute(
                f"INSERT INTO {table} (request_id, fingerprint, holder, lease_until_us) "  # noqa: S608
                "VALUES (?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
                (request_id, fingerprint, holder, lease_until_us),
            )
            answer = await tx.fetchone(
                f"SELECT 1 FROM {answers} WHERE request_id = ?",  # noqa: S608
                (request_id,),
            )
            if answer is not None:
                if inserted:
                    await settle(tx, table, request_id)
                return Claimed(ClaimKind.ANSWERED)
            if inserted:
                return Claimed(ClaimKind.RESERVED, holder, lease_until_us)
            row = await tx.fetchone(
                f"SELECT fingerprint, holder, lease_until_us FROM {table} WHERE request_id = ?",  # noqa: S608
                (request_id,),
            )
            if row is None:  # released (or answered) since the insert looked: ask again
                return Claimed(ClaimKind.HELD, "", 0)
            if row[0] != fingerprint:
                return Claimed(ClaimKind.REUSED, row[1], int(row[2]))
            if int(row[2]) > now_us and row[1] != holder:
                return Claimed(ClaimKind.HELD, row[1], int(row[2]))
            taken = await tx.execute(
                f"UPDATE {table} SET holder = ?, lease_until_us = ? "  # noqa: S608
                "WHERE request_id = ? AND holder = ? AND lease_until_us = ?",
                (holder, lease_until_us, request_id, row[1], row[2]),
            )
            if not taken:  # another replica took it over first
                return Claimed(ClaimKind.HELD, "", 0)
            return Claimed(ClaimKind.TAKEN_OVER, row[1], int(row[2]))

        return await self._run(go)

    def _run(self, work: Work[T]) -> Awaitable[T]:
        """PostgreSQL: each statement commits by itself; elsewhere (tests on SQLite) one transaction."""
        return self._db.read(work) if self.shared else self._db.transaction(work)

    async def renew(self, request_id: str, holder: str, lease_until_us: int) -> bool:
        """Extend ``holder``'s lease; False when it no longer holds the id (answered, or taken over)."""
        changed = await self._run(
            lambda tx: tx.execute(
                f"UPDATE {self.table} SET lease_until_us = ? "  # noqa: S608
                "WHERE request_id = ? AND holder = ?",
                (lease_until_us, request_id, holder),
            )
        )
        return changed == 1

    async def release(self, request_id: str, holder: str) -> None:
        """``holder`` gives the id up without an answer (its work failed): the next caller runs it."""
        await self._run(
            lambda tx: tx.execute(
                f"DELETE FROM {self.table} WHERE request_id = ? AND holder = ?",  # noqa: S608
                (request_id, holder),
            )
        )

    async def holder_of(self, request_id: str) -> str | None:
        """Who holds the reservation of ``request_id`` now (None: nobody)."""
        row = await self._db.read(
            lambda tx: tx.fetchone(
                f"SELECT holder FROM {self.table} WHERE request_id = ?",  # noqa: S608
                (request_id,),
            )
        )
        return None if row is None else str(row[0])
