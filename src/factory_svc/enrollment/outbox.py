"""The durable enrollment outbox (SQLite): enrollments accepted while DPS was unreachable wait here and are
delivered later, in order (by sequence number), exactly once.

Each entry is committed (WAL, synchronous=FULL) before the Enroll answer is sent, so a killed process loses
nothing.  Delivery is "at least once" on the wire and "exactly once" in effect: a delivery whose outcome
was lost in a crash is retried, and the retry recognises its own earlier write (same certificate and same
activation-code hash in DPS) instead of writing again.  An entry carries what the enrollment decision
needs at delivery: the owner OEM named, the reason of a replace and the caller (for the audit).  The same
file keeps the request ids of Enroll / EnrollBatch / TransferOwnership for idempotent replays, and the
enrollment audit: one row per replaced enrollment and per ownership transfer, with the caller and the
reason (``enrollment_audit``); and (migration 3) the activation codes not yet acknowledged
(``enrollment.retained``).

File: ``<data_dir>/enrollments.sqlite3``.  All SQLite calls run on the store's own thread (litestore).
"""

from __future__ import annotations

import asyncio
import enum
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from factory_svc.enrollment import retained
from litestore import Options, Schema, Store, Synchronous

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

# Version 1 is the original schema (files written before versions were kept have version 0 and these tables).
# Version 3: the retained activation codes (``enrollment.retained``).
MIGRATIONS = (SCHEMA, ENROLLMENT_AUDIT, retained.MIGRATION)
# FULL: an accepted enrollment is promised to the caller; it must survive a power cut, not only a crash.
OPTIONS = Options(synchronous=Synchronous.FULL)


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
    ``rotate-code`` (a new activation code) or ``acknowledge-code`` (a retained code forgotten)."""

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
    primary = body["attestation"]["x509"]["clientCertificates"]["primary"]
    code = dict(body["optionalDeviceInformation"]["activationCode"])
    return str(primary["certificate"]), code, EntryIntent()


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _moment(us: int | None) -> datetime | None:
    return None if us is None else datetime.fromtimestamp(us / 1_000_000, UTC)


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


class Outbox:
    def __init__(self, store: Store) -> None:
        self._store = store
        self.changed = asyncio.Event()  # set when entries are added (wakes the delivery loop)

    @classmethod
    async def open(cls, path: Path) -> Outbox:
        return cls(await Store.open(path, Schema("enrollment outbox", MIGRATIONS), OPTIONS))

    @property
    def store(self) -> Store:
        """The file's store, shared with ``RetainedCodes``."""
        return self._store

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._store.run(fn)

    async def close(self) -> None:
        await self._store.close()

    # ----------------------------------------------------------------------------------------- writes
    async def enqueue(self, entries: Sequence[NewEntry], now: datetime) -> list[int]:
        def go(db: sqlite3.Connection) -> list[int]:
            seqs = []
            for e in entries:
                cursor = db.execute(
                    "INSERT INTO outbox (device_id, mode, body, sha256_thumbprint, state, queued_us) "
                    "VALUES (?, ?, ?, ?, 'pending', ?)",
                    (e.device_id, e.mode.value, _body(e), e.sha256_thumbprint, _us(now)),
                )
                seqs.append(int(cursor.lastrowid or 0))
            return seqs

        seqs = await self._store.transaction(go)
        self.changed.set()
        return seqs

    async def record_attempt(self, seq: int, reason: str, message: str) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE outbox SET attempts = attempts + 1, failure_reason = ?, failure_message = ? "
                "WHERE seq = ? AND state = 'pending'",
                (reason, message, seq),
            )
        )

    async def mark_delivered(self, seq: int, outcome: str, now: datetime) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE outbox SET state = 'delivered', attempts = attempts + 1, outcome = ?, "
                "delivered_us = ?, failure_reason = '', failure_message = '' "
                "WHERE seq = ? AND state = 'pending'",
                (outcome, _us(now), seq),
            )
        )

    async def mark_failed(self, seq: int, reason: str, message: str) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE outbox SET state = 'failed', attempts = attempts + 1, failure_reason = ?, "
                "failure_message = ? WHERE seq = ? AND state = 'pending'",
                (reason, message, seq),
            )
        )

    # ------------------------------------------------------------------------------------------ reads
    async def oldest_pending(self) -> OutboxEntry | None:
        def go(db: sqlite3.Connection) -> OutboxEntry | None:
            row = db.execute(_SELECT + "WHERE state = 'pending' ORDER BY seq LIMIT 1").fetchone()
            return _entry(row) if row else None

        return await self._run(go)

    async def pending_count(self) -> int:
        return await self._run(
            lambda db: int(db.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0])
        )

    async def latest_for(self, device_id: str) -> OutboxEntry | None:
        def go(db: sqlite3.Connection) -> OutboxEntry | None:
            row = db.execute(
                _SELECT + "WHERE device_id = ? ORDER BY seq DESC LIMIT 1", (device_id,)
            ).fetchone()
            return _entry(row) if row else None

        return await self._run(go)

    async def entries(self) -> list[OutboxEntry]:
        def go(db: sqlite3.Connection) -> list[OutboxEntry]:
            return [_entry(r) for r in db.execute(_SELECT + "ORDER BY seq").fetchall()]

        return await self._run(go)

    # -------------------------------------------------------------------------------- request ids
    async def find_request(self, request_id: str) -> tuple[str, dict[str, Any]] | None:
        def go(db: sqlite3.Connection) -> tuple[str, dict[str, Any]] | None:
            row = db.execute(
                "SELECT fingerprint, response FROM enroll_requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            return (row[0], json.loads(row[1])) if row else None

        return await self._run(go)

    async def remember_request(self, request_id: str, fingerprint: str, response: dict[str, Any]) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR IGNORE INTO enroll_requests (request_id, fingerprint, response) VALUES (?, ?, ?)",
                (request_id, fingerprint, json.dumps(response)),
            )
        )

    # ---------------------------------------------------------------------------------------- audit
    async def record_audit(self, record: AuditRecord) -> None:
        await self.record_audits([record])

    async def record_audits(self, records: Sequence[AuditRecord]) -> None:
        """Several audit rows in one transaction (one commit)."""
        rows = [(_us(r.time), r.action, r.device_id, r.caller, r.request_id, r.detail) for r in records]

        def go(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO enrollment_audit (time_us, action, device_id, caller, request_id, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

        if rows:
            await self._store.transaction(go)

    async def audit(self, device_id: str) -> list[AuditRecord]:
        def go(db: sqlite3.Connection) -> list[AuditRecord]:
            rows = db.execute(
                "SELECT time_us, action, device_id, caller, request_id, detail FROM enrollment_audit "
                "WHERE device_id = ? ORDER BY id",
                (device_id,),
            ).fetchall()
            return [AuditRecord(_moment(r[0]) or datetime.fromtimestamp(0, UTC), *r[1:]) for r in rows]

        return await self._run(go)
