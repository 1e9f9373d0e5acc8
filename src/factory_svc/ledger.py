"""The SQLite ledger of issued certificates (and of request ids, for idempotency).

Every issued certificate is committed (WAL, synchronous=FULL) before ``record`` returns.  Writes from
concurrent RPCs are grouped into one transaction per flush (litestore's group commit), written with one
multi-row INSERT per table; if one record conflicts the batch is redone record by record, each in its own
savepoint, so one conflicting record never loses the others.  The unexpired count answered with each
record is the id's count once its batch is in.  The connection lives on the store's own thread: SQLite
calls block, the event loop must not.  One flush costs one hand-off to that thread and one wake-up of the
event loop, whatever its size; the records that arrive meanwhile form the next batch.

Calls the server refused before any factory code ran (no party identity, or a role the access table does
not allow, see ``provkit.authz``) are written to the ``refusals`` table (``record_refusal`` /
``refusals()``): the factory's trail of who tried what.

File: ``<data_dir>/ledger.sqlite3`` (plus its ``-wal``/``-shm`` companions).
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from factory_svc.keys import KeyType
from factory_svc.model import IssuedCertificate, KeySource, Revocation, RevocationReason
from litestore import GroupCommit, Options, Schema, Store, Synchronous
from provkit.authz import Refusal

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

# Version 1 is the original schema (files written before versions were kept have version 0 and these tables).
MIGRATIONS = (SCHEMA, REVOCATION, LOTS)
# FULL: a certificate handed out must stay on record (limits and audits count it) even after a power cut.
# One statement cache entry per multi-row INSERT size.
OPTIONS = Options(synchronous=Synchronous.FULL, cached_statements=512)

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


def _count_unexpired_many(ids: int) -> str:
    marks = ", ".join("?" * ids)
    return (
        f"SELECT device_id, COUNT(*) FROM certificates WHERE device_id IN ({marks}) "  # noqa: S608 - marks only
        "AND not_after_us > ? GROUP BY device_id"
    )


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _us(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_us(value: int) -> datetime:
    return datetime.fromtimestamp(value // 1_000_000, UTC).replace(microsecond=value % 1_000_000)


def _row(cert: IssuedCertificate) -> tuple[object, ...]:
    return (
        cert.serial_number,
        cert.device_id,
        cert.certificate_pem,
        cert.chain_pem,
        cert.sha1_thumbprint,
        cert.sha256_thumbprint,
        _us(cert.not_before),
        _us(cert.not_after),
        _us(cert.issued_at),
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
        not_before=_from_us(row[6]),
        not_after=_from_us(row[7]),
        issued_at=_from_us(row[8]),
        key_type=KeyType(row[9]),
        key_source=KeySource(row[10]),
        caller=row[11],
        request_id=row[12],
        revocation=None if row[13] is None else Revocation(_from_us(row[13]), RevocationReason(row[14])),
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
    return Cursor(_us(certificate.issued_at), certificate.serial_number)


@dataclass(frozen=True)
class StoredLot:
    fingerprint: str
    item_count: int
    acknowledged: bool


@dataclass(frozen=True)
class LotEntry:
    """One issued item of a lot, as the ledger keeps it."""

    index: int
    certificate: IssuedCertificate
    private_key_pem: str | None  # server-generated, until the lot is acknowledged


@dataclass
class _Pending:
    certificate: IssuedCertificate
    fingerprint: str | None
    now_us: int


class SqliteLedger:
    def __init__(self, store: Store) -> None:
        self.path = store.path
        self._store = store
        self._writes: GroupCommit[_Pending, Recorded | RequestIdTaken] = GroupCommit(store, self._write_batch)

    @classmethod
    async def open(cls, path: Path) -> SqliteLedger:
        return cls(await Store.open(path, Schema("ledger", MIGRATIONS), OPTIONS))

    async def close(self) -> None:
        await self._store.close()

    # ------------------------------------------------------------------------------ thread-side helpers
    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._store.run(fn)

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
            return self._insert_one_by_one(db, batch)
        db.execute("RELEASE together")
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

    @staticmethod
    def _insert_one_by_one(db: sqlite3.Connection, batch: list[_Pending]) -> list[Recorded | RequestIdTaken]:
        results: list[Recorded | RequestIdTaken] = []
        for item in batch:
            db.execute("SAVEPOINT record")
            try:
                db.execute(_INSERT_CERTIFICATE, _row(item.certificate))
                if item.fingerprint is not None:
                    db.execute(
                        _INSERT_REQUEST,
                        (item.certificate.request_id, item.fingerprint, item.certificate.serial_number),
                    )
            except sqlite3.IntegrityError:
                db.execute("ROLLBACK TO record")
                db.execute("RELEASE record")
                results.append(RequestIdTaken())
                continue
            db.execute("RELEASE record")
            (count,) = db.execute(_COUNT_UNEXPIRED, (item.certificate.device_id, item.now_us)).fetchone()
            results.append(Recorded(count))
        return results

    # ------------------------------------------------------------------------------------- async API
    async def record(
        self, certificate: IssuedCertificate, fingerprint: str | None, now: datetime
    ) -> Recorded | RequestIdTaken:
        """Commit one issued certificate (and its request id when ``fingerprint`` is given)."""
        return await self._writes.submit(_Pending(certificate, fingerprint, _us(now)))

    async def find_request(self, request_id: str) -> StoredRequest | None:
        def query(db: sqlite3.Connection) -> StoredRequest | None:
            row = db.execute(_SELECT_REQUEST, (request_id,)).fetchone()
            return None if row is None else StoredRequest(row[0], _certificate(row[1:]))

        return await self._call(query)

    async def get(self, serial_number: str) -> IssuedCertificate | None:
        def query(db: sqlite3.Connection) -> IssuedCertificate | None:
            row = db.execute(_SELECT_BY_SERIAL, (serial_number,)).fetchone()
            return None if row is None else _certificate(row)

        return await self._call(query)

    async def count_unexpired(self, device_id: str, now: datetime) -> int:
        def query(db: sqlite3.Connection) -> int:
            (count,) = db.execute(
                _COUNT_UNEXPIRED,
                (device_id, _us(now)),
            ).fetchone()
            return int(count)

        return await self._call(query)

    async def list(self, device_id: str | None, limit: int, after: Cursor | None) -> list[IssuedCertificate]:
        """Newest first; ``after`` continues below the given (issued_at, serial) position."""

        def query(db: sqlite3.Connection) -> list[IssuedCertificate]:
            clauses: list[str] = []
            params: list[str | int] = []
            if device_id:
                clauses.append("device_id = ?")
                params.append(device_id)
            if after is not None:
                clauses.append("(issued_at_us < ? OR (issued_at_us = ? AND serial_number < ?))")
                params += [after.issued_at_us, after.issued_at_us, after.serial_number]
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM certificates {where} "  # noqa: S608 - fixed fragments only
                "ORDER BY issued_at_us DESC, serial_number DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
            return [_certificate(r) for r in rows]

        return await self._call(query)

    async def record_refusal(self, refusal: Refusal) -> None:
        row = (
            _us(refusal.time),
            refusal.method,
            refusal.caller,
            refusal.role,
            refusal.device_id,
            refusal.request_id,
            refusal.reason,
        )
        await self._store.transaction(
            lambda db: db.execute(
                "INSERT INTO refusals (time_us, method, caller, role, device_id, request_id, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        )

    async def refusals(self) -> builtins.list[Refusal]:  # (``list`` here is the method above)
        def query(db: sqlite3.Connection) -> builtins.list[Refusal]:
            rows = db.execute(
                "SELECT time_us, method, caller, role, device_id, request_id, reason "
                "FROM refusals ORDER BY id"
            ).fetchall()
            return [Refusal(_from_us(r[0]), *r[1:]) for r in rows]

        return await self._call(query)

    # ------------------------------------------------------------------------------------- revocation
    async def certificates_of(self, device_id: str, now: datetime) -> builtins.list[IssuedCertificate]:
        """The device's unexpired certificates (revoked or not), oldest first."""

        def query(db: sqlite3.Connection) -> builtins.list[IssuedCertificate]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE device_id = ? AND not_after_us > ? "  # noqa: S608
                "ORDER BY issued_at_us, serial_number",
                (device_id, _us(now)),
            ).fetchall()
            return [_certificate(r) for r in rows]

        return await self._call(query)

    async def revoke(
        self,
        serials: Sequence[str],
        revocation: Revocation,
        caller: str,
        request_id: str,
    ) -> tuple[builtins.list[IssuedCertificate], int]:
        """Mark the certificates revoked (those revoked before keep their first time and reason) and audit
        the ones this call revoked, in one transaction: (the certificates as they are now, newly revoked)."""
        at_us = _us(revocation.time)

        def write(db: sqlite3.Connection) -> tuple[builtins.list[IssuedCertificate], int]:
            newly = 0
            for serial in serials:
                changed = db.execute(
                    "UPDATE certificates SET revoked_at_us = ?, revocation_reason = ? "
                    "WHERE serial_number = ? AND revoked_at_us IS NULL",
                    (at_us, revocation.reason.value, serial),
                ).rowcount
                if changed:
                    newly += 1
                    audit = (at_us, revocation.reason.value, caller, request_id, serial)
                    db.execute(_AUDIT_REVOCATION, audit)
            rows = [db.execute(_SELECT_BY_SERIAL, (serial,)).fetchone() for serial in serials]
            return [_certificate(r) for r in rows if r is not None], newly

        return await self._store.transaction(write)

    async def revoked(self, now: datetime) -> builtins.list[IssuedCertificate]:
        """Revoked certificates that have not expired yet (what the CRL lists), in revocation order."""

        def query(db: sqlite3.Connection) -> builtins.list[IssuedCertificate]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM certificates "  # noqa: S608 - fixed fragments only
                "WHERE revoked_at_us IS NOT NULL AND not_after_us > ? ORDER BY revoked_at_us, serial_number",
                (_us(now),),
            ).fetchall()
            return [_certificate(r) for r in rows]

        return await self._call(query)

    async def revocation_of(self, sha256_thumbprint: str) -> Revocation | None:
        """The revocation of the certificate with this SHA-256 thumbprint (None: not revoked, or unknown)."""

        def query(db: sqlite3.Connection) -> Revocation | None:
            row = db.execute(
                "SELECT revoked_at_us, revocation_reason FROM certificates "
                "WHERE sha256_thumbprint = ? AND revoked_at_us IS NOT NULL LIMIT 1",
                (sha256_thumbprint.upper(),),
            ).fetchone()
            return None if row is None else Revocation(_from_us(row[0]), RevocationReason(row[1]))

        return await self._call(query)

    async def revocation_audit(self) -> builtins.list[tuple[datetime, str, str, str, str, str]]:
        """Every revocation call's effect: (time, serial, device id, reason, caller, request id)."""

        def query(db: sqlite3.Connection) -> builtins.list[tuple[datetime, str, str, str, str, str]]:
            rows = db.execute(
                "SELECT time_us, serial_number, device_id, reason, caller, request_id "
                "FROM revocations ORDER BY id"
            ).fetchall()
            return [(_from_us(r[0]), *r[1:]) for r in rows]

        return await self._call(query)

    # ------------------------------------------------------------------------------------------- lots
    async def open_lot(
        self, lot_id: str, fingerprint: str, item_count: int, caller: str, now: datetime
    ) -> tuple[StoredLot, dict[int, LotEntry]]:
        """The lot (created now if new) and the items it has issued so far."""

        def work(db: sqlite3.Connection) -> tuple[StoredLot, dict[int, LotEntry]]:
            db.execute(
                "INSERT OR IGNORE INTO lots (lot_id, fingerprint, item_count, caller, created_us) "
                "VALUES (?, ?, ?, ?, ?)",
                (lot_id, fingerprint, item_count, caller, _us(now)),
            )
            stored, count, acknowledged = db.execute(
                "SELECT fingerprint, item_count, acknowledged_us FROM lots WHERE lot_id = ?", (lot_id,)
            ).fetchone()
            rows = db.execute(
                f"SELECT i.item_index, i.private_key_pem, {_PREFIXED} FROM lot_items i "  # noqa: S608
                "JOIN certificates c USING (serial_number) WHERE i.lot_id = ?",
                (lot_id,),
            ).fetchall()
            entries = {row[0]: LotEntry(row[0], _certificate(row[2:]), row[1]) for row in rows}
            return StoredLot(stored, count, acknowledged is not None), entries

        return await self._store.transaction(work)

    async def record_lot_items(self, lot_id: str, entries: Sequence[LotEntry]) -> None:
        """Commit a chunk of a lot's certificates and their items together: all or none."""

        def write(db: sqlite3.Connection) -> None:
            for chunk in _chunks([_row(e.certificate) for e in entries], _ROWS_PER_INSERT):
                db.execute(_insert_many(_INSERT_CERTIFICATE, len(chunk)), [v for row in chunk for v in row])
            lot_rows: builtins.list[tuple[object, ...]] = [
                (lot_id, e.index, e.certificate.device_id, e.certificate.serial_number, e.private_key_pem)
                for e in entries
            ]
            for chunk in _chunks(lot_rows, _ROWS_PER_INSERT):
                db.execute(_insert_many(_INSERT_LOT_ITEM, len(chunk)), [v for row in chunk for v in row])

        await self._store.transaction(write)

    async def acknowledge_lot(self, lot_id: str, now: datetime) -> None:
        """The client has the lot: forget its server-generated keys."""

        def write(db: sqlite3.Connection) -> None:
            db.execute("UPDATE lot_items SET private_key_pem = NULL WHERE lot_id = ?", (lot_id,))
            db.execute("UPDATE lots SET acknowledged_us = ? WHERE lot_id = ?", (_us(now), lot_id))

        await self._store.transaction(write)
