"""Renewals in the ledger database (``factory_svc.ledger``, version 6): the ``renewals`` intents, and on
``certificates`` which certificate a renewed one ``replaces`` and which one ``superseded_by`` a renewal.

A renewal is written in one transaction: the new certificate, its ``replaces`` link, the intent (state
``issued``) and the abandonment of the device's earlier renewals nobody used; the device's renewals of the
last 24 hours are counted in that same transaction (over the limit: nothing of it stays, ``RateLimited``),
so concurrent requests of one device cannot pass it together.  Two requests for the same old
certificate with the same new key meet on the intent's unique key (old serial, key): the second gets the
first's renewal.  Completion (old superseded, intent done) is one transaction as well.

Where the database has one writer (SQLite), the renewals' writes (``record``, ``advance``) that arrive
together share one transaction and one commit (``Database.group_commit``; each write in its own savepoint,
so one that fails leaves nothing and fails alone), as MintCertificate's records do.  A renewal request reads
the ledger once (``holder_and_prior``: the presented certificate, whether it was superseded, its device's
open renewals, a renewal already issued for this old certificate and key, and the device's renewals of the
last 24 hours): one hand-off to the database's thread.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from dbstore import Conflict, Database, Tx
from dbstore.grouped import GroupedTransactions
from factory_svc.mint.model import IssuedCertificate
from factory_svc.mint.store import COLUMNS, INSERT_CERTIFICATE, certificate_from_row, certificate_row
from factory_svc.renewal.model import ExpiringCertificate, Renewal, RenewalState
from provkit.clock import from_us, to_us

T = TypeVar("T")

# Version 6 of the ledger.
MIGRATION = """
ALTER TABLE certificates ADD COLUMN replaces TEXT;
ALTER TABLE certificates ADD COLUMN superseded_by TEXT;
CREATE TABLE renewals (
    new_serial TEXT PRIMARY KEY REFERENCES certificates (serial_number),
    old_serial TEXT NOT NULL REFERENCES certificates (serial_number),
    device_id TEXT NOT NULL,
    key_sha256 TEXT NOT NULL,
    requested_us INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated_us INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    failure_reason TEXT NOT NULL DEFAULT '',
    UNIQUE (old_serial, key_sha256)
);
CREATE INDEX renewals_by_device ON renewals (device_id, requested_us);
CREATE INDEX renewals_open ON renewals (requested_us) WHERE state IN ('issued', 'secondary', 'promote');
"""

_RENEWAL = (
    "SELECT new_serial, old_serial, device_id, key_sha256, requested_us, state, attempts, failure_reason "
    "FROM renewals"
)
_OPEN = "state IN ('issued', 'secondary', 'promote')"
_EXPIRING = (
    "SELECT c.device_id, c.serial_number, c.not_after_us, c.superseded_by, "
    "(SELECT r.new_serial FROM renewals r WHERE r.old_serial = c.serial_number "
    " AND r.state IN ('issued', 'secondary', 'promote') ORDER BY r.requested_us DESC LIMIT 1) "
    "FROM certificates c WHERE c.revoked_at_us IS NULL AND c.not_after_us > ? "
    "AND c.not_after_us <= ? AND NOT EXISTS (SELECT 1 FROM renewals p WHERE "
    "p.new_serial = c.serial_number AND p.state IN ('issued', 'secondary', 'promote')) "
    "ORDER BY c.not_after_us, c.serial_number"
)
# Days-to-expiry buckets of the gauge: (label, upper bound in days); the last one has none.
BUCKETS = (("expired", 0), ("7d", 7), ("30d", 30), ("90d", 90), ("365d", 365), ("later", None))


_HOLDER = f"SELECT {COLUMNS}, superseded_by FROM certificates WHERE serial_number = ?"  # noqa: S608
_FIND = f"{_RENEWAL} WHERE old_serial = ? AND key_sha256 = ?"
_RECENT = "SELECT requested_us FROM renewals WHERE device_id = ? AND requested_us > ? ORDER BY requested_us"
_DAY = timedelta(days=1)


def _renewal(row: Sequence[Any]) -> Renewal:
    return Renewal(row[0], row[1], row[2], row[3], from_us(row[4]), RenewalState(row[5]), int(row[6]), row[7])


@dataclass(frozen=True)
class Holder:
    """A certificate a device presents, as the ledger knows it: the record, the certificate that
    superseded it (a renewal the device uses), and its device's open renewals (oldest first)."""

    certificate: IssuedCertificate
    superseded_by: str | None
    open_renewals: list[Renewal]


@dataclass(frozen=True)
class Prior:
    """What the ledger holds before a renewal is issued: the renewal already issued for the same old
    certificate and new key (a retry), and when the device's renewals of the last 24 hours were requested
    (oldest first)."""

    found: Renewal | None
    recent: list[datetime]


@dataclass(frozen=True)
class RateLimited:
    """``record`` refused: the device had ``max_per_day`` renewals in the 24 hours before this one
    (``recent``: when they were requested, oldest first); nothing was written."""

    recent: list[datetime]


async def _recent(tx: Tx, device_id: str, since: datetime) -> list[datetime]:
    return [from_us(r[0]) for r in await tx.fetchall(_RECENT, (device_id, to_us(since)))]


async def _holder(tx: Tx, serial_number: str) -> Holder | None:
    row = await tx.fetchone(_HOLDER, (serial_number,))
    if row is None:
        return None
    certificate = certificate_from_row(row)
    rows = await tx.fetchall(
        f"{_RENEWAL} WHERE device_id = ? AND {_OPEN} ORDER BY requested_us, new_serial",
        (certificate.device_id,),
    )
    return Holder(certificate, row[-1], [_renewal(r) for r in rows])


async def _prior(tx: Tx, old_serial: str, key_sha256: str, device_id: str, since: datetime) -> Prior:
    found = await tx.fetchone(_FIND, (old_serial, key_sha256))
    return Prior(None if found is None else _renewal(found), await _recent(tx, device_id, since))


class RenewalStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        # One writer (SQLite): the writes of concurrent renewals share one transaction (group commit).
        self._writes = GroupedTransactions(db)

    async def _write(self, work: Callable[[Tx], Coroutine[Any, Any, T]]) -> T:
        """``work`` in a transaction: the group's, where writes are grouped, else its own."""
        return await self._writes.run(work)

    async def record(
        self, certificate: IssuedCertificate, renewal: Renewal, max_per_day: int | None = None
    ) -> Renewal | RateLimited:
        """The new certificate and its renewal (state ``issued``), durably, in one transaction; the device's
        earlier renewals still waiting for use are abandoned.  When another request recorded a renewal for
        the same old certificate and key first, that one is answered (and nothing of this one written).
        ``max_per_day``: when the device already had that many renewals in the 24 hours before
        ``renewal.requested_at``, nothing is written and ``RateLimited`` answered."""

        async def write(tx: Tx) -> Renewal | RateLimited:
            if max_per_day is not None:
                recent = await _recent(tx, renewal.device_id, renewal.requested_at - _DAY)
                if len(recent) >= max_per_day:
                    found = await tx.fetchone(_FIND, (renewal.old_serial, renewal.key_sha256))
                    return RateLimited(recent) if found is None else _renewal(found)
            try:
                async with tx.savepoint():
                    return await insert(tx)
            except Conflict:
                found = await tx.fetchone(_FIND, (renewal.old_serial, renewal.key_sha256))
                if found is None:
                    raise
                return _renewal(found)

        async def insert(tx: Tx) -> Renewal:
            now_us = to_us(renewal.requested_at)
            await tx.execute(INSERT_CERTIFICATE, certificate_row(certificate))
            await tx.execute(
                "UPDATE certificates SET replaces = ? WHERE serial_number = ?",
                (renewal.old_serial, certificate.serial_number),
            )
            await tx.execute(
                "UPDATE renewals SET state = 'abandoned', updated_us = ? "
                "WHERE device_id = ? AND state IN ('issued', 'secondary')",
                (now_us, renewal.device_id),
            )
            await tx.execute(
                "INSERT INTO renewals (new_serial, old_serial, device_id, key_sha256, requested_us, state, "
                "updated_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    renewal.new_serial,
                    renewal.old_serial,
                    renewal.device_id,
                    renewal.key_sha256,
                    now_us,
                    renewal.state.value,
                    now_us,
                ),
            )
            return renewal

        return await self._write(write)

    async def holder(self, serial_number: str) -> Holder | None:
        """The presented certificate's record, its successor in use and its device's open renewals."""
        return await self._db.read(lambda tx: _holder(tx, serial_number))

    async def holder_and_prior(
        self, serial_number: str, key_sha256: str, since: datetime
    ) -> tuple[Holder | None, Prior]:
        """``holder`` and, for its device, ``prior``: what a renewal request needs, in one read."""

        async def read(tx: Tx) -> tuple[Holder | None, Prior]:
            holder = await _holder(tx, serial_number)
            if holder is None:
                return None, Prior(None, [])
            return holder, await _prior(tx, serial_number, key_sha256, holder.certificate.device_id, since)

        return await self._db.read(read)

    async def of_new(self, new_serial: str) -> Renewal | None:
        """The renewal that issued this certificate (None: a minted one)."""
        row = await self._db.read(lambda tx: tx.fetchone(f"{_RENEWAL} WHERE new_serial = ?", (new_serial,)))
        return None if row is None else _renewal(row)

    async def open_renewals(self, device_id: str | None = None) -> list[Renewal]:
        """Renewals whose steps are not done, oldest first (of one device, or all)."""
        where, params = (
            (f"WHERE {_OPEN}", ())
            if device_id is None
            else (f"WHERE device_id = ? AND {_OPEN}", (device_id,))
        )
        rows = await self._db.read(
            lambda tx: tx.fetchall(f"{_RENEWAL} {where} ORDER BY requested_us, new_serial", params)
        )
        return [_renewal(r) for r in rows]

    async def issued_since(self, device_id: str, since: datetime) -> list[datetime]:
        """When the device's renewals issued since ``since`` were requested, oldest first."""
        return await self._db.read(lambda tx: _recent(tx, device_id, since))

    async def superseded_by(self, serial_number: str) -> str | None:
        holder = await self.holder(serial_number)
        return None if holder is None else holder.superseded_by

    async def advance(
        self, renewal: Renewal, states: Sequence[RenewalState], to: RenewalState, now: datetime
    ) -> bool:
        """Move the renewal to ``to`` if it is in one of ``states`` (false: it moved on meanwhile)."""
        marks = ", ".join("?" * len(states))
        sql = (
            f"UPDATE renewals SET state = ?, updated_us = ?, failure_reason = '' "  # noqa: S608 - marks only
            f"WHERE new_serial = ? AND state IN ({marks})"
        )
        params = (to.value, to_us(now), renewal.new_serial, *(s.value for s in states))
        return bool(await self._write(lambda tx: tx.execute(sql, params)))

    async def complete(self, renewal: Renewal, now: datetime) -> bool:
        """The old certificate superseded by the new one and the renewal done, in one transaction."""

        async def write(tx: Tx) -> bool:
            changed = await tx.execute(
                "UPDATE renewals SET state = 'done', updated_us = ?, failure_reason = '' "
                "WHERE new_serial = ? AND state = 'promote'",
                (to_us(now), renewal.new_serial),
            )
            if changed:
                await tx.execute(
                    "UPDATE certificates SET superseded_by = ? WHERE serial_number = ?",
                    (renewal.new_serial, renewal.old_serial),
                )
            return bool(changed)

        return await self._db.transaction(write)

    async def failed(self, renewal: Renewal, reason: str) -> None:
        """One more attempt at the renewal's next step that could not finish (it stays open)."""
        await self._db.transaction(
            lambda tx: tx.execute(
                "UPDATE renewals SET attempts = attempts + 1, failure_reason = ? WHERE new_serial = ?",
                (reason, renewal.new_serial),
            )
        )

    # ------------------------------------------------------------------------------------ the operator
    async def expiring(self, now: datetime, until: datetime) -> list[ExpiringCertificate]:
        """Unrevoked, unexpired certificates that expire by ``until`` (not those a renewal issued and
        nobody used yet), soonest first, each with where its renewal is."""
        rows = await self._db.read(lambda tx: tx.fetchall(_EXPIRING, (to_us(now), to_us(until))))
        out = []
        for device_id, serial, not_after_us, superseded, pending in rows:
            if superseded is not None:
                out.append(ExpiringCertificate(device_id, serial, from_us(not_after_us), "done", superseded))
            elif pending is not None:
                out.append(ExpiringCertificate(device_id, serial, from_us(not_after_us), "pending", pending))
            else:
                out.append(ExpiringCertificate(device_id, serial, from_us(not_after_us), "none"))
        return out

    async def expiry_buckets(self, now: datetime) -> dict[str, int]:
        """Certificates in use (unrevoked, not superseded; expired ones of the last year counted as
        ``expired``) by days to expiry: the gauge's buckets."""
        day_us = 86_400_000_000
        now_us = to_us(now)
        cases, params = [], []
        for label, days in BUCKETS:
            if days is None:
                cases.append(f"ELSE '{label}'")
            else:
                cases.append(f"WHEN not_after_us <= ? THEN '{label}'")
                params.append(now_us + days * day_us)
        sql = (
            f"SELECT CASE {' '.join(cases)} END AS bucket, COUNT(*) FROM certificates "  # noqa: S608
            "WHERE revoked_at_us IS NULL AND superseded_by IS NULL AND not_after_us > ? GROUP BY bucket"
        )
        rows = await self._db.read(lambda tx: tx.fetchall(sql, (*params, now_us - 365 * day_us)))
        counts = {label: 0 for label, _ in BUCKETS}
        counts.update({str(r[0]): int(r[1]) for r in rows})
        return counts

    async def certificate(self, serial_number: str) -> IssuedCertificate | None:
        row = await self._db.read(
            lambda tx: tx.fetchone(
                f"SELECT {COLUMNS} FROM certificates WHERE serial_number = ?",  # noqa: S608
                (serial_number,),
            )
        )
        return None if row is None else certificate_from_row(row)
