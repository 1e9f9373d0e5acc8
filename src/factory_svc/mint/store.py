"""The issued certificates and MintCertificate's request ids, in the ledger database (``factory_svc.ledger``).

Every issued certificate is committed before ``record`` returns.  Writes from concurrent RPCs are grouped
into one transaction per flush (the database's group commit, ``Database.group_commit``: on SQLite, WAL and
synchronous=FULL, on the store's thread; on PostgreSQL, the records of this process, ``dbstore.grouped``),
written with one multi-row INSERT per table; if one record conflicts the batch is redone record by record,
each in its own savepoint, so one conflicting record never loses the others.  A record is answered only once
the commit holding it has completed; a group whose commit fails fails every record in it (none is answered
as issued).  The unexpired count answered with each record is the id's count once its batch is in.  On
SQLite one flush costs one hand-off to the database's thread and one wake-up of the event loop, whatever its
size; on PostgreSQL one BEGIN, a few statements and one COMMIT instead of six round trips per certificate.
The records that arrive meanwhile form the next batch, and while records come together a batch waits up to
``GATHER_SECONDS`` for as many as the last one had (fewer commits, each a sync of the log, for a few
milliseconds more per answer under load only).  Crash point (tests): ``ledger.before_commit``, a batch
written but not committed.

Between replicas (PostgreSQL) the primary keys (serial number, request id) decide, and the unexpired count is
read in the batch's transaction.

MintCertificate request ids are reserved before the work (``mint_reservations``, ``dbstore.reservations``;
written on PostgreSQL only) and the reservation is deleted in the transaction that commits the certificate
and its request id (``record``).

The row codec of ``certificates`` (``COLUMNS``, ``certificate_row``, ``certificate_from_row``) is shared with
the other stores of the ledger database (revocation, lots), which read and write the same table.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from dbstore import Backend, Conflict, Database, Tx, reservations
from factory_svc.mint.keys import KeyType
from factory_svc.mint.model import IssuedCertificate, KeySource
from factory_svc.revocation.model import Revocation, RevocationReason
from provkit.clock import from_us, to_us
from provkit.faults import crash_point

T = TypeVar("T")

# MintCertificate request ids reserved before the work, for replicas (``dbstore.reservations``).
RESERVATIONS = "mint_reservations"
# While mints come together, a batch waits up to this long for more before it is written (see above).
GATHER_SECONDS = 0.005

COLUMNS = (
    "serial_number, device_id, certificate_pem, chain_pem, sha1_thumbprint, sha256_thumbprint, "
    "not_before_us, not_after_us, issued_at_us, key_type, key_source, caller, request_id, "
    "revoked_at_us, revocation_reason"
)

INSERT_CERTIFICATE = (
    "INSERT INTO certificates (serial_number, device_id, certificate_pem, chain_pem, sha1_thumbprint, "
    "sha256_thumbprint, not_before_us, not_after_us, issued_at_us, key_type, key_source, caller, request_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_REQUEST = "INSERT INTO mint_requests (request_id, fingerprint, serial_number) VALUES (?, ?, ?)"
SELECT_BY_SERIAL = f"SELECT {COLUMNS} FROM certificates WHERE serial_number = ?"  # noqa: S608
_SELECT_REQUEST = (
    "SELECT r.fingerprint, c.serial_number, c.device_id, c.certificate_pem, c.chain_pem, c.sha1_thumbprint, "
    "c.sha256_thumbprint, c.not_before_us, c.not_after_us, c.issued_at_us, c.key_type, c.key_source, "
    "c.caller, c.request_id, c.revoked_at_us, c.revocation_reason "
    "FROM mint_requests r JOIN certificates c USING (serial_number) "
    "WHERE r.request_id = ?"
)
_COUNT_UNEXPIRED = "SELECT COUNT(*) FROM certificates WHERE device_id = ? AND not_after_us > ?"
ROWS_PER_INSERT = 64  # 64 rows x 13 columns stays below SQLite's oldest limit of 999 parameters


def _insert_many(statement: str, rows: int) -> str:
    """``INSERT ... VALUES (?, ...)`` for ``rows`` rows (one statement: one step for the whole chunk)."""
    head, one = statement.split(" VALUES ")
    return f"{head} VALUES {', '.join([one] * rows)}"


async def insert_rows(tx: Tx, statement: str, rows: list[tuple[object, ...]]) -> None:
    """``rows`` by multi-row INSERTs of ``ROWS_PER_INSERT`` rows at most."""
    for chunk in chunks(rows, ROWS_PER_INSERT):
        await tx.execute(_insert_many(statement, len(chunk)), [v for row in chunk for v in row])


def _count_unexpired_many(ids: int) -> str:
    marks = ", ".join("?" * ids)
    return (
        f"SELECT device_id, COUNT(*) FROM certificates WHERE device_id IN ({marks}) "  # noqa: S608 - marks only
        "AND not_after_us > ? GROUP BY device_id"
    )


def chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def certificate_row(cert: IssuedCertificate) -> tuple[object, ...]:
    """The values of ``INSERT_CERTIFICATE``."""
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


def certificate_from_row(row: Sequence[Any]) -> IssuedCertificate:
    """A row of ``COLUMNS``."""
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


@dataclass
class _Pending:
    certificate: IssuedCertificate
    fingerprint: str | None
    now_us: int


async def _record_one(tx: Tx, item: _Pending) -> Recorded | RequestIdTaken:
    """One record in its own savepoint: a taken request id (or serial) leaves nothing of it."""
    try:
        async with tx.savepoint():
            await tx.execute(INSERT_CERTIFICATE, certificate_row(item.certificate))
            if item.fingerprint is not None:
                request = (item.certificate.request_id, item.fingerprint, item.certificate.serial_number)
                await tx.execute(_INSERT_REQUEST, request)
                await reservations.settle(tx, RESERVATIONS, item.certificate.request_id)
    except Conflict:
        return RequestIdTaken()
    row = await tx.fetchone(_COUNT_UNEXPIRED, (item.certificate.device_id, item.now_us))
    return Recorded(int(row[0]) if row else 0)


async def _insert_together(tx: Tx, batch: list[_Pending], settle: bool) -> list[Recorded | RequestIdTaken]:
    await insert_rows(tx, INSERT_CERTIFICATE, [certificate_row(item.certificate) for item in batch])
    requests: list[tuple[object, ...]] = [
        (item.certificate.request_id, item.fingerprint, item.certificate.serial_number)
        for item in batch
        if item.fingerprint is not None
    ]
    await insert_rows(tx, _INSERT_REQUEST, requests)
    if settle:  # request ids are reserved (``dbstore.reservations``): their reservations end with this commit
        for ids in chunks([str(row[0]) for row in requests], ROWS_PER_INSERT * 4):
            await reservations.settle_many(tx, RESERVATIONS, ids)
    # The unexpired count of each id once the batch is in, at the batch's latest moment.
    now_us = max(item.now_us for item in batch)
    counts: dict[str, int] = {}
    for ids in chunks(sorted({item.certificate.device_id for item in batch}), ROWS_PER_INSERT):
        rows = await tx.fetchall(_count_unexpired_many(len(ids)), (*ids, now_us))
        counts.update((str(r[0]), int(r[1])) for r in rows)
    return [Recorded(counts.get(item.certificate.device_id, 0)) for item in batch]


_CERTIFICATE_MARKS = "(" + ", ".join("?" * 13) + ")"


async def _insert_in_one_statement(
    tx: Tx, batch: list[_Pending], settle: bool
) -> list[Recorded | RequestIdTaken]:
    """PostgreSQL: the whole batch in one statement (each statement is a round trip, and each round trip a
    turn of a busy event loop): the certificates and their request ids inserted (a taken serial or request
    id skipped, not an error that would spoil the transaction), the reservations of the request ids stored
    ended, and the unexpired counts read.  The statement's reads see the table as it was before its own
    inserts, so each id's count adds the batch's own unexpired certificates.  A certificate whose request id
    was taken is deleted again (a second statement, only then)."""
    now_us = max(item.now_us for item in batch)
    requests = [
        (item.certificate.request_id, item.fingerprint, item.certificate.serial_number)
        for item in batch
        if item.fingerprint is not None
    ]
    device_ids = sorted({item.certificate.device_id for item in batch})
    sql = (
        f"WITH c AS ({INSERT_CERTIFICATE.split(' VALUES ')[0]} VALUES "
        f"{', '.join([_CERTIFICATE_MARKS] * len(batch))} "
        "ON CONFLICT (serial_number) DO NOTHING RETURNING serial_number)"
    )
    params: list[object] = [v for item in batch for v in certificate_row(item.certificate)]
    taken_rows = "SELECT NULL::text WHERE false"
    if requests:
        sql += (
            ", r AS (INSERT INTO mint_requests (request_id, fingerprint, serial_number) "  # noqa: S608
            "SELECT v.request_id, v.fingerprint, v.serial_number FROM (VALUES "
            f"{', '.join(['(?, ?, ?)'] * len(requests))}) AS v (request_id, fingerprint, serial_number) "
            "JOIN c USING (serial_number) ON CONFLICT (request_id) DO NOTHING RETURNING request_id)"
        )
        params += [v for row in requests for v in row]
        taken_rows = "SELECT request_id FROM r"
        if settle:
            sql += f", d AS (DELETE FROM {RESERVATIONS} WHERE request_id IN (SELECT request_id FROM r))"  # noqa: S608
    sql += (
        " SELECT 'c', serial_number, 0 FROM c"  # noqa: S608
        f" UNION ALL SELECT 'r', t.request_id, 0 FROM ({taken_rows}) AS t (request_id)"
        " UNION ALL SELECT 'n', device_id, COUNT(*) FROM certificates "
        f"WHERE device_id IN ({', '.join('?' * len(device_ids))}) AND not_after_us > ? GROUP BY device_id"
    )
    params += [*device_ids, now_us]
    inserted: set[str] = set()
    requested: set[str] = set()
    counts: dict[str, int] = {}
    for kind, key, count in await tx.fetchall(sql, params):
        if kind == "c":
            inserted.add(str(key))
        elif kind == "r":
            requested.add(str(key))
        else:
            counts[str(key)] = int(count)
    kept: list[_Pending] = []
    undo: list[str] = []
    results: list[Recorded | RequestIdTaken | None] = []
    for item in batch:
        serial = item.certificate.serial_number
        if serial not in inserted:  # a duplicate serial: nothing of this record was written
            results.append(RequestIdTaken())
        elif item.fingerprint is not None and item.certificate.request_id not in requested:
            undo.append(serial)  # its request id is another record's: its certificate goes again
            results.append(RequestIdTaken())
        else:
            kept.append(item)
            results.append(None)
    if undo:
        marks = ", ".join("?" * len(undo))
        await tx.execute(f"DELETE FROM certificates WHERE serial_number IN ({marks})", undo)  # noqa: S608
    for item in kept:
        if to_us(item.certificate.not_after) > now_us:
            device_id = item.certificate.device_id
            counts[device_id] = counts.get(device_id, 0) + 1
    return [
        Recorded(counts.get(item.certificate.device_id, 0)) if result is None else result
        for item, result in zip(batch, results, strict=True)
    ]


async def _write_batch(tx: Tx, batch: list[_Pending], *, settle: bool) -> list[Recorded | RequestIdTaken]:
    """Inside the group's transaction.  Usually a handful of statements whatever its size (each statement
    is a GIL hand-over between the database's thread and the event loop; on PostgreSQL one statement, see
    ``_insert_in_one_statement``); when a record conflicts (request id taken by another process, or a
    duplicate serial) the batch is redone record by record."""
    if tx.backend is Backend.POSTGRESQL:
        results = await _insert_in_one_statement(tx, batch, settle)
        crash_point("ledger.before_commit")
        return results
    try:
        async with tx.savepoint():
            results = await _insert_together(tx, batch, settle)
    except Conflict:
        results = [await _record_one(tx, item) for item in batch]
    crash_point("ledger.before_commit")  # the group written, not committed, nobody answered
    return results


class CertificateStore:
    """``certificates`` and ``mint_requests``: record what MintCertificate issued, and read it back."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.reservations = reservations.Reservations(db, RESERVATIONS, "mint_requests")
        # Records arriving together share one transaction (group commit).
        write = functools.partial(_write_batch, settle=self.reservations.shared)
        self._writes = db.group_commit(write, gather=GATHER_SECONDS)

    @property
    def group_commits(self) -> int:
        """Groups of records committed together so far (0 where the database cannot group)."""
        return 0 if self._writes is None else self._writes.commits

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
        return None if row is None else StoredRequest(row[0], certificate_from_row(row[1:]))

    async def get(self, serial_number: str) -> IssuedCertificate | None:
        row = await self._db.read(lambda tx: tx.fetchone(SELECT_BY_SERIAL, (serial_number,)))
        return None if row is None else certificate_from_row(row)

    async def count_unexpired(self, device_id: str, now: datetime) -> int:
        row = await self._db.read(lambda tx: tx.fetchone(_COUNT_UNEXPIRED, (device_id, to_us(now))))
        return int(row[0]) if row else 0

    async def page(self, device_id: str | None, limit: int, after: Cursor | None) -> list[IssuedCertificate]:
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
            f"SELECT {COLUMNS} FROM certificates {where} "  # noqa: S608 - fixed fragments only
            "ORDER BY issued_at_us DESC, serial_number DESC LIMIT ?"
        )
        rows = await self._db.read(lambda tx: tx.fetchall(sql, (*params, limit)))
        return [certificate_from_row(r) for r in rows]

    async def certificates_of(self, device_id: str, now: datetime) -> list[IssuedCertificate]:
        """The device's unexpired certificates (revoked or not), oldest first."""
        rows = await self._db.read(
            lambda tx: tx.fetchall(
                f"SELECT {COLUMNS} FROM certificates WHERE device_id = ? AND not_after_us > ? "  # noqa: S608
                "ORDER BY issued_at_us, serial_number",
                (device_id, to_us(now)),
            )
        )
        return [certificate_from_row(r) for r in rows]
