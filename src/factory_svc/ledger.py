"""The ledger of issued certificates (and of request ids, for idempotency), through ``dbstore``.

Every issued certificate is committed before ``record`` returns.  On SQLite (the default, WAL,
synchronous=FULL) writes from
concurrent RPCs are grouped into one transaction per flush (litestore's group commit), written with one
multi-row INSERT per table; if one record conflicts the batch is redone record by record, each in its own
savepoint, so one conflicting record never loses the others.  The unexpired count answered with each
record is the id's count once its batch is in.  The connection lives on the store's own thread: SQLite
calls block, the event loop must not.  One flush costs one hand-off to that thread and one wake-up of the
event loop, whatever its size; the records that arrive meanwhile form the next batch, and while records
come together a batch waits up to ``GATHER_SECONDS`` for as many as the last one had (fewer commits, each
a sync of the WAL, for a few milliseconds more per answer under load only).  Crash point (tests):
``ledger.before_commit``, a batch written but not committed.

Calls the server refused before any factory code ran (no party identity, or a role the access table does
not allow, see ``provkit.authz``) are written to the ``refusals`` table (``record_refusal`` /
``refusals()``): the factory's trail of who tried what.

File: ``<data_dir>/ledger.sqlite3`` (plus its ``-wal``/``-shm`` companions).  On PostgreSQL (the service's
``database_url``, shared by replicas) each record is its own transaction; the primary keys (serial number,
request id) decide between replicas, and the unexpired count is read in the record's transaction.

Revocations (the marks on ``certificates`` and the ``revocations`` audit, schema version 2) and production
lots (``lots`` and ``lot_items``, version 3) are one transaction per call on either backend; between
replicas an UPDATE's row lock and a lot's primary key decide.

MintCertificate request ids are reserved before the work (``mint_reservations``, version 4,
``dbstore.reservations``; written on PostgreSQL only) and the reservation is deleted in the transaction
that commits the certificate and its request id (``record``).

Version 5: a revocation's intent (the device's cloud steps still owed, ``revocation_intents``) is written
in the revocation's transaction, and ``crl_state`` holds what replicas share about the CRL: the last
number handed out (a CRL number is taken under the row's lock, in the transaction that reads the revoked
certificates, so a higher number never lists less) and a generation each revocation increments (a cheap
read tells a replica its CRL is stale).
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from dbstore import Conflict, Database, DatabaseUrl, Tx, open_database, reservations
from dbstore.port import Row, Work
from dbstore.sqlite import SqliteDatabase, SqliteTx, run_now
from factory_svc.keys import KeyType
from factory_svc.model import IssuedCertificate, KeySource, Revocation, RevocationReason
from litestore import GroupCommit, Options, Schema, Synchronous
from provkit.authz import Refusal
from provkit.clock import from_us, to_us
from provkit.faults import crash_point

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    serial_number TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    certificate_pem TEXT NOT NULL,
    chain_pem TEXT NOT NULL,
    sha1_thumbprint TEXT NOT NULL,
    sha256_thumbprint TEXT NOT NULL,
    not_before_us INTEGER NOT NULL,
    not_after_us INTEGER NOT NULL,
    issued_at_us INTEGER NOT NULL,
    key_type TEXT NOT NULL,
    key_source TEXT NOT NULL,
    caller TEXT NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_by_device ON certificates (device_id, not_after_us);
CREATE INDEX IF NOT EXISTS certificates_by_time ON certificates (issued_at_us, serial_number);
CREATE TABLE IF NOT EXISTS mint_requests (
    request_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    serial_number TEXT NOT NULL REFERENCES certificates (serial_number)
);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_us INTEGER NOT NULL,
    method TEXT NOT NULL,
    caller TEXT NOT NULL,
    role TEXT NOT NULL,
    device_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""

# Version 2: revocation (when and why a certificate was revoked; the audit of each revocation call).
REVOCATION = """
ALTER TABLE certificates ADD COLUMN revoked_at_us INTEGER;
ALTER TABLE certificates ADD COLUMN revocation_reason TEXT;
CREATE INDEX certificates_by_sha256 ON certificates (sha256_thumbprint);
CREATE INDEX certificates_revoked ON certificates (revoked_at_us) WHERE revoked_at_us IS NOT NULL;
CREATE TABLE revocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_us INTEGER NOT NULL,
    serial_number TEXT NOT NULL REFERENCES certificates (serial_number),
    device_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    caller TEXT NOT NULL,
    request_id TEXT NOT NULL
);
"""

# Version 3: production lots (MintCertificates): each lot's header fingerprint, and which certificate each
# of its items got; a server-generated key waits in lot_items until the client acknowledges the lot.
LOTS = """
CREATE TABLE lots (
    lot_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    item_count INTEGER NOT NULL,
    caller TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    acknowledged_us INTEGER
);
CREATE TABLE lot_items (
    lot_id TEXT NOT NULL REFERENCES lots (lot_id),
    item_index INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    serial_number TEXT NOT NULL REFERENCES certificates (serial_number),
    private_key_pem TEXT,
    PRIMARY KEY (lot_id, item_index),
    UNIQUE (lot_id, device_id)
);
"""

# Version 4: MintCertificate request ids reserved before the work, for replicas (``dbstore.reservations``).
RESERVATIONS = "mint_reservations"

# Version 5: revocation intents (the cloud steps a revocation still owes: one row per device, open until its
# DPS enrollment and hub identity are disabled) and the CRL state every replica shares: the last CRL number
# handed out and a generation that grows with every revocation (a replica republishes when it changes).
REVOCATION_INTENTS = """
CREATE TABLE revocation_intents (
    device_id TEXT PRIMARY KEY,
    requested_us INTEGER NOT NULL,
    completed_us INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    failure_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX revocation_intents_open ON revocation_intents (requested_us) WHERE completed_us IS NULL;
CREATE TABLE crl_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    crl_number INTEGER NOT NULL,
    generation INTEGER NOT NULL
);
INSERT INTO crl_state (id, crl_number, generation) VALUES (1, 0, 0);
"""

# Version 1 is the original schema (files written before versions were kept have version 0 and these tables).
MIGRATIONS = (SCHEMA, REVOCATION, LOTS, reservations.migration(RESERVATIONS), REVOCATION_INTENTS)
# FULL: a certificate handed out must stay on record (limits and audits count it) even after a power cut.
# One statement cache entry per multi-row INSERT size.
OPTIONS = Options(synchronous=Synchronous.FULL, cached_statements=512)
SCHEMA_VERSIONS = Schema("ledger", MIGRATIONS)
# While mints come together, a batch waits up to this long for more before it is written (see above).
GATHER_SECONDS = 0.005
FILE = "ledger.sqlite3"

_COLUMNS = (
    "serial_number, device_id, certificate_pem, chain_pem, sha1_thumbprint, sha256_thumbprint, "
    "not_before_us, not_after_us, issued_at_us, key_type, key_source, caller, request_id, "
    "revoked_at_us, revocation_reason"
)

_INSERT_CERTIFICATE = (
    "INSERT INTO certificates (serial_number, device_id, certificate_pem, chain_pem, sha1_thumbprint, "
    "sha256_thumbprint, not_before_us, not_after_us, issued_at_us, key_type, key_source, caller, request_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_REQUEST = "INSERT INTO mint_requests (request_id, fingerprint, serial_number) VALUES (?, ?, ?)"
_SELECT_BY_SERIAL = f"SELECT {_COLUMNS} FROM certificates WHERE serial_number = ?"  # noqa: S608
_SELECT_REQUEST = (
    "SELECT r.fingerprint, c.serial_number, c.device_id, c.certificate_pem, c.chain_pem, c.sha1_thumbprint, "
    "c.sha256_thumbprint, c.not_before_us, c.not_after_us, c.issued_at_us, c.key_type, c.key_source, "
    "c.caller, c.request_id, c.revoked_at_us, c.revocation_reason "
    "FROM mint_requests r JOIN certificates c USING (serial_number) "
    "WHERE r.request_id = ?"
)
_PREFIXED = ", ".join(f"c.{column.strip()}" for column in _COLUMNS.split(","))
_INSERT_LOT_ITEM = (
    "INSERT INTO lot_items (lot_id, item_index, device_id, serial_number, private_key_pem) "
    "VALUES (?, ?, ?, ?, ?)"
)
_AUDIT_REVOCATION = (
    "INSERT INTO revocations (time_us, serial_number, device_id, reason, caller, request_id) "
    "SELECT ?, serial_number, device_id, ?, ?, ? FROM certificates WHERE serial_number = ?"
)
_COUNT_UNEXPIRED = "SELECT COUNT(*) FROM certificates WHERE device_id = ? AND not_after_us > ?"
_ROWS_PER_INSERT = 64  # 64 rows x 13 columns stays below SQLite's oldest limit of 999 parameters


def _insert_many(statement: str, rows: int) -> str:
    """``INSERT ... VALUES (?, ...)`` for ``rows`` rows (one statement: one step for the whole chunk)."""
    head, one = statement.split(" VALUES ")
    return f"{head} VALUES {', '.join([one] * rows)}"


async def _insert_rows(tx: Tx, statement: str, rows: list[tuple[object, ...]]) -> None:
    """``rows`` by multi-row INSERTs of ``_ROWS_PER_INSERT`` rows at most."""
    for chunk in _chunks(rows, _ROWS_PER_INSERT):
        await tx.execute(_insert_many(statement, len(chunk)), [v for row in chunk for v in row])


def _count_unexpired_many(ids: int) -> str:
    marks = ", ".join("?" * ids)
    return (
        f"SELECT device_id, COUNT(*) FROM certificates WHERE device_id IN ({marks}) "  # noqa: S608 - marks only
        "AND not_after_us > ? GROUP BY device_id"
    )


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _row(cert: IssuedCertificate) -> tuple[object, ...]:
    return (
        cert.serial_number,
        cert.device_id,
        cert.certificate_pem,
        cert.chain_pem,
        cert.sha1_thumbprint,
        cert.sha256_thumbprint,
        to_us(cert.not_before),
        to_us(cert.not_after),
        to_us(cert.issued_at),
        cert.key_type.value,
        cert.key_source.value,
        cert.caller,
        cert.request_id,
    )


def _certificate(row: sqlite3.Row | tuple[Any, ...]) -> IssuedCertificate:
    return IssuedCertificate(
        serial_number=row[0],
        device_id=row[1],
        certificate_pem=row[2],
        chain_pem=row[3],
        sha1_thumbprint=row[4],
        sha256_thumbprint=row[5],
        not_before=from_us(row[6]),
        not_after=from_us(row[7]),
        issued_at=from_us(row[8]),
        key_type=KeyType(row[9]),
        key_source=KeySource(row[10]),
        caller=row[11],
        request_id=row[12],
        revocation=None if row[13] is None else Revocation(from_us(row[13]), RevocationReason(row[14])),
    )


@dataclass(frozen=True)
class StoredRequest:
    fingerprint: str
    certificate: IssuedCertificate


@dataclass(frozen=True)
class Recorded:
    unexpired_count: int


@dataclass(frozen=True)
class RequestIdTaken:
    """Another record with the same request id won the race."""


@dataclass(frozen=True)
class Cursor:
    issued_at_us: int
    serial_number: str


def cursor_of(certificate: IssuedCertificate) -> Cursor:
    return Cursor(to_us(certificate.issued_at), certificate.serial_number)


@dataclass(frozen=True)
class StoredLot:
    fingerprint: str
    item_count: int
    acknowledged: bool


class LotItemsTaken(Exception):
    """A lot's chunk was not recorded: another attempt of the lot committed one of its items first."""


@dataclass(frozen=True)
class LotEntry:
    """One issued item of a lot, as the ledger keeps it."""

    index: int
    certificate: IssuedCertificate
    private_key_pem: str | None  # server-generated, until the lot is acknowledged


@dataclass(frozen=True)
class CrlContent:
    """What one CRL is made of: its number, the generation it reflects, the revoked certificates."""

    number: int
    generation: int
    revoked: list[IssuedCertificate]


@dataclass(frozen=True)
class RevocationIntent:
    """A device's revocation steps in the cloud, owed since ``requested_us`` (until ``completed``)."""

    device_id: str
    requested_us: int
    attempts: int = 0
    failure_reason: str = ""
    completed: bool = False


async def _open_intent(tx: Tx, device_id: str, at_us: int) -> None:
    await tx.execute(
        "INSERT INTO revocation_intents (device_id, requested_us) VALUES (?, ?) "
        "ON CONFLICT (device_id) DO UPDATE SET requested_us = CASE WHEN revocation_intents.requested_us "
        ">= excluded.requested_us THEN revocation_intents.requested_us + 1 ELSE excluded.requested_us END, "
        "completed_us = NULL",
        (device_id, at_us),
    )


def _fetch_all(sql: str, params: Sequence[object]) -> Work[list[Row]]:
    async def work(tx: Tx) -> list[Row]:
        return await tx.fetchall(sql, params)

    return work


async def _revoked(tx: Tx, now_us: int) -> list[IssuedCertificate]:
    rows = await tx.fetchall(
        f"SELECT {_COLUMNS} FROM certificates "  # noqa: S608 - fixed fragments only
        "WHERE revoked_at_us IS NOT NULL AND not_after_us > ? ORDER BY revoked_at_us, serial_number",
        (now_us,),
    )
    return [_certificate(r) for r in rows]


@dataclass
class _Pending:
    certificate: IssuedCertificate
    fingerprint: str | None
    now_us: int


async def _record_one(tx: Tx, item: _Pending) -> Recorded | RequestIdTaken:
    """One record in its own savepoint: a taken request id (or serial) leaves nothing of it."""
    try:
        async with tx.savepoint():
            await tx.execute(_INSERT_CERTIFICATE, _row(item.certificate))
            if item.fingerprint is not None:
                request = (item.certificate.request_id, item.fingerprint, item.certificate.serial_number)
                await tx.execute(_INSERT_REQUEST, request)
                await reservations.settle(tx, RESERVATIONS, item.certificate.request_id)
    except Conflict:
        return RequestIdTaken()
    row = await tx.fetchone(_COUNT_UNEXPIRED, (item.certificate.device_id, item.now_us))
    return Recorded(int(row[0]) if row else 0)


class Ledger:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.path = db.path if isinstance(db, SqliteDatabase) else None
        self.reservations = reservations.Reservations(db, RESERVATIONS, "mint_requests")
        # SQLite: one writer thread, so records arriving together share one transaction (group commit).
        self._writes: GroupCommit[_Pending, Recorded | RequestIdTaken] | None = None
        if isinstance(db, SqliteDatabase):
            self._writes = GroupCommit(db.store, self._write_batch, gather=GATHER_SECONDS)

    @classmethod
    async def open(cls, where: Path | DatabaseUrl, *, migrate: bool = False) -> Ledger:
        """``where``: the SQLite file, or the service's database URL (see ``dbstore.open_database``)."""
        return cls(await open_database(where, FILE, SCHEMA_VERSIONS, OPTIONS, migrate=migrate))

    async def close(self) -> None:
        await self._db.close()

    # ------------------------------------------------------------------------ SQLite's group commit
    def _write_batch(self, db: sqlite3.Connection, batch: list[_Pending]) -> list[Recorded | RequestIdTaken]:
        """Inside the group's transaction.  Usually a handful of statements whatever its size (each statement
        is a GIL hand-over between this thread and the event loop); when a record conflicts (request id
        taken by another process, or a duplicate serial) the batch is redone record by record."""
        db.execute("SAVEPOINT together")
        try:
            results = self._insert_together(db, batch)
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK TO together")
            db.execute("RELEASE together")
            tx = SqliteTx(db)
            results = [run_now(_record_one(tx, item)) for item in batch]
        else:
            db.execute("RELEASE together")
        crash_point("ledger.before_commit")  # the group written, not committed, nobody answered
        return results

    @staticmethod
    def _insert_together(db: sqlite3.Connection, batch: list[_Pending]) -> list[Recorded | RequestIdTaken]:
        for chunk in _chunks([_row(item.certificate) for item in batch], _ROWS_PER_INSERT):
            db.execute(_insert_many(_INSERT_CERTIFICATE, len(chunk)), [v for row in chunk for v in row])
        requests = [
            (item.certificate.request_id, item.fingerprint, item.certificate.serial_number)
            for item in batch
            if item.fingerprint is not None
        ]
        for request_chunk in _chunks(requests, _ROWS_PER_INSERT):
            db.execute(
                _insert_many(_INSERT_REQUEST, len(request_chunk)), [v for row in request_chunk for v in row]
            )
        # The unexpired count of each id once the batch is in, at the batch's latest moment.
        now_us = max(item.now_us for item in batch)
        counts: dict[str, int] = {}
        for ids in _chunks(sorted({item.certificate.device_id for item in batch}), _ROWS_PER_INSERT):
            counts.update(db.execute(_count_unexpired_many(len(ids)), (*ids, now_us)).fetchall())
        return [Recorded(counts.get(item.certificate.device_id, 0)) for item in batch]

    # ------------------------------------------------------------------------------------- async API
    async def record(
        self, certificate: IssuedCertificate, fingerprint: str | None, now: datetime
    ) -> Recorded | RequestIdTaken:
        """Commit one issued certificate (and its request id when ``fingerprint`` is given)."""
        item = _Pending(certificate, fingerprint, to_us(now))
        if self._writes is not None:
            return await self._writes.submit(item)
        return await self._db.transaction(lambda tx: _record_one(tx, item))

    async def find_request(self, request_id: str) -> StoredRequest | None:
        row = await self._db.read(lambda tx: tx.fetchone(_SELECT_REQUEST, (request_id,)))
        return None if row is None else StoredRequest(row[0], _certificate(row[1:]))

    async def get(self, serial_number: str) -> IssuedCertificate | None:
        row = await self._db.read(lambda tx: tx.fetchone(_SELECT_BY_SERIAL, (serial_number,)))
        return None if row is None else _certificate(row)

    async def count_unexpired(self, device_id: str, now: datetime) -> int:
        row = await self._db.read(lambda tx: tx.fetchone(_COUNT_UNEXPIRED, (device_id, to_us(now))))
        return int(row[0]) if row else 0

    async def list(self, device_id: str | None, limit: int, after: Cursor | None) -> list[IssuedCertificate]:
        """Newest first; ``after`` continues below the given (issued_at, serial) position."""
        clauses: list[str] = []
        params: list[object] = []
        if device_id:
            clauses.append("device_id = ?")
            params.append(device_id)
        if after is not None:
            clauses.append("(issued_at_us < ? OR (issued_at_us = ? AND serial_number < ?))")
            params += [after.issued_at_us, after.issued_at_us, after.serial_number]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            f"SELECT {_COLUMNS} FROM certificates {where} "  # noqa: S608 - fixed fragments only
            "ORDER BY issued_at_us DESC, serial_number DESC LIMIT ?"
        )
        rows = await self._db.read(lambda tx: tx.fetchall(sql, (*params, limit)))
        return [_certificate(r) for r in rows]

    async def record_refusal(self, refusal: Refusal) -> None:
        row = (
            to_us(refusal.time),
            refusal.method,
            refusal.caller,
            refusal.role,
            refusal.device_id,
            refusal.request_id,
            refusal.reason,
        )
        await self._db.transaction(
            lambda tx: tx.execute(
                "INSERT INTO refusals (time_us, method, caller, role, device_id, request_id, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        )

    async def refusals(self) -> builtins.list[Refusal]:  # (``list`` here is the method above)
        rows = await self._db.read(
            lambda tx: tx.fetchall(
                "SELECT time_us, method, caller, role, device_id, request_id, reason "
                "FROM refusals ORDER BY id"
            )
        )
        return [Refusal(from_us(r[0]), *r[1:]) for r in rows]

    # ------------------------------------------------------------------------------------- revocation
    async def certificates_of(self, device_id: str, now: datetime) -> builtins.list[IssuedCertificate]:
        """The device's unexpired certificates (revoked or not), oldest first."""
        rows = await self._db.read(
            lambda tx: tx.fetchall(
                f"SELECT {_COLUMNS} FROM certificates WHERE device_id = ? AND not_after_us > ? "  # noqa: S608
                "ORDER BY issued_at_us, serial_number",
                (device_id, to_us(now)),
            )
        )
        return [_certificate(r) for r in rows]

    async def revoke(
        self,
        serials: Sequence[str],
        revocation: Revocation,
        caller: str,
        request_id: str,
        intent_for: str | None = None,
    ) -> tuple[builtins.list[IssuedCertificate], int]:
        """Mark the certificates revoked (those revoked before keep their first time and reason) and audit
        the ones this call revoked, in one transaction: (the certificates as they are now, newly revoked).
        Between replicas the row lock decides: a certificate another call revoked meanwhile is not counted.
        ``intent_for``: the device whose cloud steps this revocation owes (its intent is opened in the same
        transaction).  A call that revoked something increments the CRL generation."""
        at_us = to_us(revocation.time)

        async def write(tx: Tx) -> tuple[builtins.list[IssuedCertificate], int]:
            newly = 0
            for serial in serials:
                changed = await tx.execute(
                    "UPDATE certificates SET revoked_at_us = ?, revocation_reason = ? "
                    "WHERE serial_number = ? AND revoked_at_us IS NULL",
                    (at_us, revocation.reason.value, serial),
                )
                if changed:
                    newly += 1
                    await tx.execute(
                        _AUDIT_REVOCATION, (at_us, revocation.reason.value, caller, request_id, serial)
                    )
            if newly:
                await tx.execute("UPDATE crl_state SET generation = generation + 1 WHERE id = 1")
            if intent_for is not None:
                await _open_intent(tx, intent_for, at_us)
            rows = [await tx.fetchone(_SELECT_BY_SERIAL, (serial,)) for serial in serials]
            return [_certificate(r) for r in rows if r is not None], newly

        return await self._db.transaction(write)

    async def revoked(self, now: datetime) -> builtins.list[IssuedCertificate]:
        """Revoked certificates that have not expired yet (what the CRL lists), in revocation order."""
        return await self._db.read(lambda tx: _revoked(tx, to_us(now)))

    async def next_crl(self, now: datetime, at_least: int) -> CrlContent:
        """A new CRL number (above every one handed out before, by any replica, and at least ``at_least``),
        the generation and the revoked certificates, read in one transaction after the number was taken."""

        async def work(tx: Tx) -> CrlContent:
            await tx.execute(
                "UPDATE crl_state SET crl_number = "
                "CASE WHEN crl_number + 1 > ? THEN crl_number + 1 ELSE ? END WHERE id = 1",
                (at_least, at_least),
            )
            row = await tx.fetchone("SELECT crl_number, generation FROM crl_state WHERE id = 1")
            assert row is not None  # written by the migration
            return CrlContent(int(row[0]), int(row[1]), await _revoked(tx, to_us(now)))

        return await self._db.transaction(work)

    async def crl_generation(self) -> int:
        """How many revocation calls changed the ledger (all replicas): a CRL of an older one is stale."""
        row = await self._db.read(lambda tx: tx.fetchone("SELECT generation FROM crl_state WHERE id = 1"))
        return int(row[0]) if row else 0

    async def revoked_among(self, sha256_thumbprints: Sequence[str]) -> set[str]:
        """Those of the SHA-256 thumbprints (upper case) whose certificate is revoked."""
        wanted = sorted({t.upper() for t in sha256_thumbprints})
        found: set[str] = set()
        for chunk in _chunks(wanted, _ROWS_PER_INSERT):
            marks = ", ".join("?" * len(chunk))
            sql = (
                f"SELECT sha256_thumbprint FROM certificates WHERE sha256_thumbprint IN ({marks}) "  # noqa: S608
                "AND revoked_at_us IS NOT NULL"
            )
            found.update(str(r[0]) for r in await self._db.read(_fetch_all(sql, chunk)))
        return found

    # ------------------------------------------------------------------------------ revocation intents
    async def open_revocation_intent(self, device_id: str, now: datetime) -> None:
        """The device's revocation steps are owed (again): its intent is open from now."""
        await self._db.transaction(lambda tx: _open_intent(tx, device_id, to_us(now)))

    async def open_revocation_intents(self) -> builtins.list[RevocationIntent]:
        """The open intents, oldest first."""
        rows = await self._db.read(
            lambda tx: tx.fetchall(
                "SELECT device_id, requested_us, attempts, failure_reason FROM revocation_intents "
                "WHERE completed_us IS NULL ORDER BY requested_us, device_id"
            )
        )
        return [RevocationIntent(r[0], int(r[1]), int(r[2]), r[3]) for r in rows]

    async def revocation_intent(self, device_id: str) -> RevocationIntent | None:
        """The device's intent (open or completed; None: never revoked with a cloud configured)."""
        row = await self._db.read(
            lambda tx: tx.fetchone(
                "SELECT device_id, requested_us, attempts, failure_reason, completed_us "
                "FROM revocation_intents WHERE device_id = ?",
                (device_id,),
            )
        )
        if row is None:
            return None
        return RevocationIntent(row[0], int(row[1]), int(row[2]), row[3], row[4] is not None)

    async def close_revocation_intent(self, intent: RevocationIntent, now: datetime) -> bool:
        """The intent's steps are done: closed unless a newer revocation reopened it meanwhile."""
        return bool(
            await self._db.transaction(
                lambda tx: tx.execute(
                    "UPDATE revocation_intents SET completed_us = ?, failure_reason = '' "
                    "WHERE device_id = ? AND requested_us = ? AND completed_us IS NULL",
                    (to_us(now), intent.device_id, intent.requested_us),
                )
            )
        )

    async def revocation_intent_failed(self, intent: RevocationIntent, reason: str) -> None:
        """One more attempt that could not finish (the intent stays open)."""
        await self._db.transaction(
            lambda tx: tx.execute(
                "UPDATE revocation_intents SET attempts = attempts + 1, failure_reason = ? "
                "WHERE device_id = ? AND completed_us IS NULL",
                (reason, intent.device_id),
            )
        )

    async def revocation_of(self, sha256_thumbprint: str) -> Revocation | None:
        """The revocation of the certificate with this SHA-256 thumbprint (None: not revoked, or unknown)."""
        row = await self._db.read(
            lambda tx: tx.fetchone(
                "SELECT revoked_at_us, revocation_reason FROM certificates "
                "WHERE sha256_thumbprint = ? AND revoked_at_us IS NOT NULL LIMIT 1",
                (sha256_thumbprint.upper(),),
            )
        )
        return None if row is None else Revocation(from_us(row[0]), RevocationReason(row[1]))

    async def revocation_audit(self) -> builtins.list[tuple[datetime, str, str, str, str, str]]:
        """Every revocation call's effect: (time, serial, device id, reason, caller, request id)."""
        rows = await self._db.read(
            lambda tx: tx.fetchall(
                "SELECT time_us, serial_number, device_id, reason, caller, request_id "
                "FROM revocations ORDER BY id"
            )
        )
        return [(from_us(r[0]), *r[1:]) for r in rows]

    # ------------------------------------------------------------------------------------------- lots
    async def open_lot(
        self, lot_id: str, fingerprint: str, item_count: int, caller: str, now: datetime
    ) -> tuple[StoredLot, dict[int, LotEntry]]:
        """The lot (created now if new) and the items it has issued so far.  Replicas opening one new lot
        at once: the primary key keeps the first, the others read it."""

        async def work(tx: Tx) -> tuple[StoredLot, dict[int, LotEntry]]:
            await tx.execute(
                "INSERT INTO lots (lot_id, fingerprint, item_count, caller, created_us) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (lot_id) DO NOTHING",
                (lot_id, fingerprint, item_count, caller, to_us(now)),
            )
            lot = await tx.fetchone(
                "SELECT fingerprint, item_count, acknowledged_us FROM lots WHERE lot_id = ?", (lot_id,)
            )
            assert lot is not None  # inserted above, or there before
            rows = await tx.fetchall(
                f"SELECT i.item_index, i.private_key_pem, {_PREFIXED} FROM lot_items i "  # noqa: S608
                "JOIN certificates c USING (serial_number) WHERE i.lot_id = ?",
                (lot_id,),
            )
            entries = {row[0]: LotEntry(row[0], _certificate(row[2:]), row[1]) for row in rows}
            return StoredLot(lot[0], int(lot[1]), lot[2] is not None), entries

        return await self._db.transaction(work)

    async def record_lot_items(self, lot_id: str, entries: Sequence[LotEntry]) -> None:
        """Commit a chunk of a lot's certificates and their items together: all or none.  Raises
        ``LotItemsTaken`` (nothing written) when another attempt of the lot committed one of its items
        first (another replica's stream of the same lot)."""
        certificates = [_row(e.certificate) for e in entries]
        items: builtins.list[tuple[object, ...]] = [  # in index order: two attempts of one lot that
            # insert the same items lock them in the same order, so the later waits and then conflicts
            # (LotItemsTaken) rather than deadlocking with the earlier
            (lot_id, e.index, e.certificate.device_id, e.certificate.serial_number, e.private_key_pem)
            for e in sorted(entries, key=lambda e: e.index)
        ]

        async def write(tx: Tx) -> None:
            await _insert_rows(tx, _INSERT_CERTIFICATE, certificates)  # a clash here stays a Conflict
            try:
                await _insert_rows(tx, _INSERT_LOT_ITEM, items)
            except Conflict:  # an item's index is taken: the whole chunk is rolled back
                raise LotItemsTaken(lot_id) from None

        await self._db.transaction(write)

    async def acknowledge_lot(self, lot_id: str, now: datetime) -> None:
        """The client has the lot: forget its server-generated keys."""

        async def write(tx: Tx) -> None:
            await tx.execute("UPDATE lot_items SET private_key_pem = NULL WHERE lot_id = ?", (lot_id,))
            await tx.execute("UPDATE lots SET acknowledged_us = ? WHERE lot_id = ?", (to_us(now), lot_id))

        await self._db.transaction(write)


# The name the ledger had while SQLite was its only backend.
SqliteLedger = Ledger
