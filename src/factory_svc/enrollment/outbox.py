"""The durable enrollment outbox: enrollments accepted while DPS was unreachable wait here and are
delivered later, in order (by sequence number), exactly once.

Each entry is committed (WAL, synchronous=FULL) before the Enroll answer is sent, so a killed process loses
nothing.  Delivery is "at least once" on the wire and "exactly once" in effect: a delivery whose outcome
was lost in a crash is retried, and the retry recognises its own earlier write (same certificate and same
activation-code hash in DPS) instead of writing again.  An entry carries what the enrollment decision
needs at delivery: the owner OEM named, the reason of a replace and the caller (for the audit).  The same
file keeps the request ids of Enroll / EnrollBatch / TransferOwnership for idempotent replays, and the
enrollment audit: one row per replaced enrollment and per ownership transfer, with the caller and the
reason (``enrollment_audit``); (migration 3) the activation codes not yet acknowledged
(``enrollment.retained``); and (migration 4) the reservations of request ids being executed
(``enroll_reservations``, ``dbstore.reservations``), ended in the answer's transaction.

Stored through ``dbstore``: the SQLite file ``<data_dir>/enrollments.sqlite3`` by default (one process,
whose delivery loop is the only one), or the service's PostgreSQL database, shared by several replicas.
There each replica's delivery loop claims the oldest pending entries that no other replica holds and that
have no older pending entry of their device (``SELECT ... FOR UPDATE SKIP LOCKED``), keeps their rows
locked while it delivers, and marks them in the same transaction (:meth:`Outbox.with_next_batch`): two
replicas never deliver one entry, a device's entries go in order, and a replica that dies mid-delivery lets
go of the rows with its connection, so another one finishes the entries (recognising writes that were
done).  An
idle delivery loop hears of its own process's new entries at once (``changed``) and looks for the other
replicas' every second (``idle_wait``).
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from dbstore import Database, DatabaseUrl, Tx, open_database, reservations
from dbstore.port import Work
from factory_svc.enrollment import retained
from litestore import Options, Schema, Synchronous
from provkit.clock import from_us, to_us
from provkit.dps_json import enrollment_from_json

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    mode TEXT NOT NULL CHECK (mode IN ('create', 'replace')),
    body TEXT NOT NULL,
    sha256_thumbprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    failure_reason TEXT NOT NULL DEFAULT '',
    failure_message TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT '',
    queued_us INTEGER NOT NULL,
    delivered_us INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_by_state ON outbox (state, seq);
CREATE INDEX IF NOT EXISTS outbox_by_device ON outbox (device_id, seq);
CREATE TABLE IF NOT EXISTS enroll_requests (
    request_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    response TEXT NOT NULL
);
"""

# Version 2: the enrollment audit (replacements and ownership transfers, with caller and reason).
ENROLLMENT_AUDIT = """
CREATE TABLE enrollment_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_us INTEGER NOT NULL,
    action TEXT NOT NULL,
    device_id TEXT NOT NULL,
    caller TEXT NOT NULL,
    request_id TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX enrollment_audit_by_device ON enrollment_audit (device_id, id);
"""

# Version 4: request ids (Enroll, EnrollBatch, RotateActivationCode, AcknowledgeActivationCodes,
# TransferOwnership) reserved before the work, for replicas (``dbstore.reservations``).
RESERVATIONS = "enroll_reservations"

# Version 1 is the original schema (files written before versions were kept have version 0 and these tables).
# Version 3: the retained activation codes (``enrollment.retained``).
MIGRATIONS = (SCHEMA, ENROLLMENT_AUDIT, retained.MIGRATION, reservations.migration(RESERVATIONS))
# FULL: an accepted enrollment is promised to the caller; it must survive a power cut, not only a crash.
# secure_delete: the file also holds the retained activation codes (``retained``), whose purged ciphertexts
# must not stay readable in free pages.
OPTIONS = Options(synchronous=Synchronous.FULL, secure_delete=True)
SCHEMA_VERSIONS = Schema("enrollment outbox", MIGRATIONS)
FILE = "enrollments.sqlite3"
# How long an idle delivery loop waits before it looks for entries again.  SQLite: the one process that
# adds entries also delivers them, and adding wakes its loop at once (``Outbox.changed``).  PostgreSQL:
# other replicas add entries this process never hears of (and one that dies leaves its entries to the
# others), so an idle loop looks every second: one indexed query.
IDLE_WAIT_ALONE = 60.0
IDLE_WAIT_SHARED = 1.0


class OutboxMode(enum.Enum):
    CREATE = "create"  # a new enrollment; an enrollment with another certificate is a refusal
    REPLACE = "replace"  # put this certificate (and code) into the enrollment, whatever it holds


class OutboxState(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    device_id: str
    mode: OutboxMode
    certificate_pem: str
    code_hash: dict[str, Any]  # provkit.activation_code's record of the code handed out
    sha256_thumbprint: str
    intent: EntryIntent
    state: OutboxState
    attempts: int
    failure_reason: str
    failure_message: str
    outcome: str
    queued_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True)
class EntryIntent:
    """The enrollment decision's inputs beside the certificate: owner named, replace reason, who asked."""

    owner: str = ""
    replace_reason: str = ""
    caller: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class NewEntry:
    device_id: str
    mode: OutboxMode
    certificate_pem: str
    code_hash: dict[str, Any]
    sha256_thumbprint: str
    intent: EntryIntent = EntryIntent()


@dataclass(frozen=True)
class AuditRecord:
    """One enrollment decision worth a trail: ``replace`` (certificate and code), ``transfer`` (owner),
    ``rotate-code`` (a new activation code), ``acknowledge-code`` (a retained code forgotten) or
    ``refuse-revoked`` (a queued enrollment whose certificate was revoked, completed without delivery)."""

    time: datetime
    action: str
    device_id: str
    caller: str
    request_id: str
    detail: str


def _body(entry: NewEntry) -> str:
    intent = entry.intent
    return json.dumps(
        {
            "certificatePem": entry.certificate_pem,
            "codeHash": entry.code_hash,
            "owner": intent.owner,
            "replaceReason": intent.replace_reason,
            "caller": intent.caller,
            "requestId": intent.request_id,
        }
    )


def _payload(text: str) -> tuple[str, dict[str, Any], EntryIntent]:
    """The certificate, code hash and intent of a stored entry.  Files written before entries had their own
    shape hold the DPS enrollment body: the certificate and the code record are read from it."""
    body = json.loads(text)
    if "certificatePem" in body:
        intent = EntryIntent(
            str(body.get("owner") or ""),
            str(body.get("replaceReason") or ""),
            str(body.get("caller") or ""),
            str(body.get("requestId") or ""),
        )
        return str(body["certificatePem"]), dict(body["codeHash"]), intent
    enrollment = enrollment_from_json(body)  # the DPS JSON is the DPS adapter's to read
    return enrollment.attestation.certificate_pem or "", dict(enrollment.code_hash or {}), EntryIntent()


def _moment(us: int | None) -> datetime | None:
    return None if us is None else from_us(us)


_SELECT = (
    "SELECT seq, device_id, mode, body, sha256_thumbprint, state, attempts, failure_reason, failure_message, "
    "outcome, queued_us, delivered_us FROM outbox "
)


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    certificate_pem, code_hash, intent = _payload(row[3])
    return OutboxEntry(
        seq=row[0],
        device_id=row[1],
        mode=OutboxMode(row[2]),
        certificate_pem=certificate_pem,
        code_hash=code_hash,
        sha256_thumbprint=row[4],
        intent=intent,
        state=OutboxState(row[5]),
        attempts=row[6],
        failure_reason=row[7],
        failure_message=row[8],
        outcome=row[9],
        queued_at=_moment(row[10]) or datetime.fromtimestamp(0, UTC),
        delivered_at=_moment(row[11]),
    )


_PENDING_FIRSTS_OF_DEVICES = (
    "WHERE state = 'pending' AND NOT EXISTS (SELECT 1 FROM outbox older "
    "WHERE older.device_id = outbox.device_id AND older.state = 'pending' AND older.seq < outbox.seq) "
    "ORDER BY seq LIMIT ?"
)


async def _record_attempt(tx: Tx, seq: int, reason: str, message: str) -> None:
    await tx.execute(
        "UPDATE outbox SET attempts = attempts + 1, failure_reason = ?, failure_message = ? "
        "WHERE seq = ? AND state = 'pending'",
        (reason, message, seq),
    )


async def _mark_delivered(tx: Tx, seq: int, outcome: str, now: datetime) -> None:
    await _mark_all_delivered(tx, [seq], outcome, now)


async def _mark_all_delivered(tx: Tx, seqs: Sequence[int], outcome: str, now: datetime) -> None:
    marks = ", ".join("?" * len(seqs))
    await tx.execute(
        "UPDATE outbox SET state = 'delivered', attempts = attempts + 1, outcome = ?, "  # noqa: S608 - marks
        f"delivered_us = ?, failure_reason = '', failure_message = '' WHERE seq IN ({marks}) "
        "AND state = 'pending'",
        (outcome, to_us(now), *seqs),
    )


class _Marks:
    """The marks of a claimed batch, written together when its handling is done: the delivered ones one
    statement per (outcome, moment), the rest one by one."""

    def __init__(self) -> None:
        self.delivered: dict[tuple[str, datetime], list[int]] = {}
        self.others: list[Work[None]] = []

    async def defer(self, work: Work[None]) -> None:
        self.others.append(work)

    async def write(self, tx: Tx) -> None:
        for (outcome, now), seqs in self.delivered.items():
            await _mark_all_delivered(tx, seqs, outcome, now)
        for work in self.others:
            await work(tx)

    def __bool__(self) -> bool:
        return bool(self.delivered or self.others)


async def _mark_failed(tx: Tx, seq: int, reason: str, message: str) -> None:
    await tx.execute(
        "UPDATE outbox SET state = 'failed', attempts = attempts + 1, failure_reason = ?, "
        "failure_message = ? WHERE seq = ? AND state = 'pending'",
        (reason, message, seq),
    )


class Claimed:
    """The entry a delivery holds; its outcome is written through :meth:`record_attempt` and the marks (in
    the claim's own transaction on PostgreSQL)."""

    def __init__(
        self, entry: OutboxEntry, run: Callable[[Work[None]], Awaitable[None]], marks: _Marks | None = None
    ) -> None:
        self.entry = entry
        self._run = run
        self._marks = marks

    async def record_attempt(self, reason: str, message: str) -> None:
        await self._run(lambda tx: _record_attempt(tx, self.entry.seq, reason, message))

    async def mark_delivered(self, outcome: str, now: datetime) -> None:
        if self._marks is not None:  # one of a batch: written with the batch's other deliveries
            self._marks.delivered.setdefault((outcome, now), []).append(self.entry.seq)
            return
        await self._run(lambda tx: _mark_delivered(tx, self.entry.seq, outcome, now))

    async def mark_failed(self, reason: str, message: str) -> None:
        await self._run(lambda tx: _mark_failed(tx, self.entry.seq, reason, message))


class Outbox:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.changed = asyncio.Event()  # set when entries are added (wakes the delivery loop)
        self.reservations = reservations.Reservations(db, RESERVATIONS, "enroll_requests")

    @classmethod
    async def open(cls, where: Path | DatabaseUrl, *, migrate: bool = False) -> Outbox:
        """``where``: the SQLite file, or the service's database URL (see ``dbstore.open_database``)."""
        return cls(await open_database(where, FILE, SCHEMA_VERSIONS, OPTIONS, migrate=migrate))

    @property
    def database(self) -> Database:
        """The store's database, shared with ``RetainedCodes``."""
        return self._db

    @property
    def idle_wait(self) -> float:
        """Seconds an idle delivery loop may wait for ``changed`` before looking again."""
        return IDLE_WAIT_SHARED if self._db.shared else IDLE_WAIT_ALONE

    async def close(self) -> None:
        await self._db.close()

    # ----------------------------------------------------------------------------------------- writes
    async def enqueue(self, entries: Sequence[NewEntry], now: datetime) -> list[int]:
        async def go(tx: Tx) -> list[int]:
            return [
                await tx.insert(
                    "INSERT INTO outbox (device_id, mode, body, sha256_thumbprint, state, queued_us) "
                    "VALUES (?, ?, ?, ?, 'pending', ?)",
                    (e.device_id, e.mode.value, _body(e), e.sha256_thumbprint, to_us(now)),
                    "seq",
                )
                for e in entries
            ]

        seqs = await self._db.transaction(go)
        self.changed.set()
        return seqs

    async def record_attempt(self, seq: int, reason: str, message: str) -> None:
        await self._db.transaction(lambda tx: _record_attempt(tx, seq, reason, message))

    async def mark_delivered(self, seq: int, outcome: str, now: datetime) -> None:
        await self._db.transaction(lambda tx: _mark_delivered(tx, seq, outcome, now))

    async def mark_failed(self, seq: int, reason: str, message: str) -> None:
        await self._db.transaction(lambda tx: _mark_failed(tx, seq, reason, message))

    async def with_next(self, handle: Callable[[Claimed], Awaitable[T]]) -> T | None:
        """``handle`` the entry to deliver next (None when there is none), holding it meanwhile.

        One process (SQLite): the oldest pending entry; each mark is its own transaction.  A database shared
        by replicas (PostgreSQL): the oldest pending entry no other replica holds and whose device has no
        older pending entry, locked for the whole of ``handle``, whose marks commit with the claim when it
        returns."""
        if not self._db.shared:
            entry = await self.oldest_pending()
            return None if entry is None else await handle(Claimed(entry, self._db.transaction))

        async def claim(tx: Tx) -> T | None:
            row = await tx.fetchone(_SELECT + _PENDING_FIRSTS_OF_DEVICES + " FOR UPDATE SKIP LOCKED", (1,))
            if row is None:
                return None
            return await handle(Claimed(_entry(row), lambda work: work(tx)))

        return await self._db.transaction(claim)

    async def with_next_batch(self, limit: int, handle: Callable[[list[Claimed]], Awaitable[T]]) -> T | None:
        """``handle`` up to ``limit`` entries to deliver next (None when there is none), holding them
        meanwhile: the oldest pending ones, each the oldest pending entry of its device, so a device's
        entries still go one at a time and in order.  Their marks are written together once ``handle``
        returns, in one transaction (one commit for the batch); nothing is marked when it raises.

        On a database shared by replicas (PostgreSQL) the entries are claimed as by :meth:`with_next`
        (``FOR UPDATE SKIP LOCKED``: rows no other replica holds), locked for the whole of ``handle``, and
        the marks commit with the claim."""
        sql = _SELECT + _PENDING_FIRSTS_OF_DEVICES

        async def handled(rows: list[tuple[Any, ...]], marks: _Marks) -> T:
            return await handle([Claimed(_entry(row), marks.defer, marks) for row in rows])

        if not self._db.shared:
            rows = await self._db.read(lambda tx: tx.fetchall(sql, (limit,)))
            if not rows:
                return None
            marks = _Marks()
            result = await handled(rows, marks)
            if marks:
                await self._db.transaction(marks.write)
            return result

        async def claim(tx: Tx) -> T | None:
            rows = await tx.fetchall(sql + " FOR UPDATE SKIP LOCKED", (limit,))
            if not rows:
                return None
            batch = _Marks()  # afresh when the transaction is run again (a deadlock)
            result = await handled(rows, batch)
            await batch.write(tx)
            return result

        return await self._db.transaction(claim)

    # ------------------------------------------------------------------------------------------ reads
    async def oldest_pending(self) -> OutboxEntry | None:
        row = await self._db.read(
            lambda tx: tx.fetchone(_SELECT + "WHERE state = 'pending' ORDER BY seq LIMIT 1")
        )
        return _entry(row) if row else None

    async def pending_count(self) -> int:
        row = await self._db.read(
            lambda tx: tx.fetchone("SELECT count(*) FROM outbox WHERE state = 'pending'")
        )
        return int(row[0]) if row else 0

    async def latest_for(self, device_id: str) -> OutboxEntry | None:
        row = await self._db.read(
            lambda tx: tx.fetchone(_SELECT + "WHERE device_id = ? ORDER BY seq DESC LIMIT 1", (device_id,))
        )
        return _entry(row) if row else None

    async def entries(self) -> list[OutboxEntry]:
        rows = await self._db.read(lambda tx: tx.fetchall(_SELECT + "ORDER BY seq"))
        return [_entry(r) for r in rows]

    # -------------------------------------------------------------------------------- request ids
    async def find_request(self, request_id: str) -> tuple[str, dict[str, Any]] | None:
        row = await self._db.read(
            lambda tx: tx.fetchone(
                "SELECT fingerprint, response FROM enroll_requests WHERE request_id = ?", (request_id,)
            )
        )
        return (row[0], json.loads(row[1])) if row else None

    async def remember_request(self, request_id: str, fingerprint: str, response: dict[str, Any]) -> bool:
        """Store the answer of ``request_id`` and end its reservation, together; False (nothing written)
        when the id has an answer already."""

        async def go(tx: Tx) -> bool:
            stored = await tx.execute(
                "INSERT INTO enroll_requests (request_id, fingerprint, response) VALUES (?, ?, ?) "
                "ON CONFLICT (request_id) DO NOTHING",
                (request_id, fingerprint, json.dumps(response)),
            )
            if stored:
                await reservations.settle(tx, RESERVATIONS, request_id)
            return stored == 1

        return await self._db.transaction(go)

    # ---------------------------------------------------------------------------------------- audit
    async def record_audit(self, record: AuditRecord) -> None:
        await self.record_audits([record])

    async def record_audits(self, records: Sequence[AuditRecord]) -> None:
        """Several audit rows in one transaction (one commit)."""
        rows = [(to_us(r.time), r.action, r.device_id, r.caller, r.request_id, r.detail) for r in records]

        async def go(tx: Tx) -> None:
            for row in rows:
                await tx.execute(
                    "INSERT INTO enrollment_audit (time_us, action, device_id, caller, request_id, detail) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )

        if rows:
            await self._db.transaction(go)

    async def audit(self, device_id: str) -> list[AuditRecord]:
        rows = await self._db.read(
            lambda tx: tx.fetchall(
                "SELECT time_us, action, device_id, caller, request_id, detail FROM enrollment_audit "
                "WHERE device_id = ? ORDER BY id",
                (device_id,),
            )
        )
        return [AuditRecord(_moment(r[0]) or datetime.fromtimestamp(0, UTC), *r[1:]) for r in rows]
