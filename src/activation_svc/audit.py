"""The activation audit trail: one durable row per Activate / Deactivate attempt, with the caller.

Stored through ``dbstore``: the SQLite file ``<data_dir>/audit.sqlite3`` by default, or the service's
PostgreSQL database (``database_url``; tables shared by all replicas). Table ``audit(time_us, action,
device_id, caller, request_id, outcome, detail)``. Written before the answer is sent. Activation codes and
metadata values are never recorded (the metadata's SHA-256 is). Calls the server refused before the service
ran (``provkit.authz``) are rows too: ``record_refusal`` writes action = the RPC's path, outcome ``refused``,
detail = reason and role; they come through ``provkit.refusal_audit`` (the first of a kind, then one summary
row per window whose detail ends "and N more like this between T1 and T2"; kill -9 loses at most the counts
of the open windows). An Activate that changes something outside writes its row when it records its intent
(outcome ``pending``, ``activation_svc.intents``, same file and transaction) and gives it its outcome when the
intent is finished: ``ok``, or ``error`` with the reason; a row still ``pending`` is a change not completed
yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from activation_svc.intents import HOLD, HOLD_MIGRATION, METADATA_MIGRATION, ActivationIntent, IntentLog
from activation_svc.intents import MIGRATION as INTENTS_MIGRATION
from activation_svc.shared_limits import DROP_DEVICE_CEILING
from activation_svc.shared_limits import MIGRATION as LIMITS_MIGRATION
from dbstore import Database, DatabaseUrl, Tx, open_database, reservations
from dbstore.grouped import GroupedTransactions
from litestore import Options, Schema, Synchronous
from provkit.authz import Refusal

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_us INTEGER NOT NULL,
    action TEXT NOT NULL,
    device_id TEXT NOT NULL,
    caller TEXT NOT NULL,
    request_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_device ON audit (device_id, id);
CREATE TABLE IF NOT EXISTS activation_requests (
    request_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    response TEXT NOT NULL
);
"""

# Version 1 is the original schema (files written before versions were kept have version 0 and these tables);
# version 2 adds the activation intents (``activation_svc.intents``).
# version 3 the wrong-code limits shared by replicas (``activation_svc.shared_limits``).
# version 4 who holds an open intent (``activation_svc.intents.HOLD_MIGRATION``).
# version 5 request ids (Activate, Deactivate) reserved before the work, for replicas
# (``dbstore.reservations``).
# version 6 drops the per-device ceiling's table (``activation_svc.shared_limits.DROP_DEVICE_CEILING``).
# version 7 what an intent does with the metadata (``activation_svc.intents.METADATA_MIGRATION``).
RESERVATIONS = "activation_reservations"
MIGRATIONS = (
    SCHEMA,
    INTENTS_MIGRATION,
    LIMITS_MIGRATION,
    HOLD_MIGRATION,
    reservations.migration(RESERVATIONS),
    DROP_DEVICE_CEILING,
    METADATA_MIGRATION,
)
# FULL: an audit row is written before the answer is sent; it must not vanish with a power cut after that.
OPTIONS = Options(synchronous=Synchronous.FULL)
SCHEMA_VERSIONS = Schema("audit", MIGRATIONS)
FILE = "audit.sqlite3"


@dataclass(frozen=True)
class AuditEntry:
    time: datetime
    action: str
    device_id: str
    caller: str
    request_id: str
    outcome: str
    detail: str


def _row(entry: AuditEntry) -> tuple[object, ...]:
    return (
        int(entry.time.timestamp() * 1_000_000),
        entry.action,
        entry.device_id,
        entry.caller,
        entry.request_id,
        entry.outcome,
        entry.detail,
    )


class AuditLog:
    def __init__(self, db: Database, intent_hold: timedelta = HOLD) -> None:
        self.db = db  # the service's database (the shared wrong-code limits use it too)
        self._db = db
        # On SQLite the writes of concurrent calls share commits (each still all or nothing, answered once
        # durable): the intents, their audit rows and the request ids' answers.
        self._writes = GroupedTransactions(db)
        self.intents = IntentLog(db, hold=intent_hold, writes=self._writes)
        self.reservations = reservations.Reservations(db, RESERVATIONS, "activation_requests")

    @classmethod
    async def open(
        cls, where: Path | DatabaseUrl, *, migrate: bool = False, intent_hold: timedelta = HOLD
    ) -> AuditLog:
        """``where``: the SQLite file, or the service's database URL (see ``dbstore.open_database``)."""
        return cls(await open_database(where, FILE, SCHEMA_VERSIONS, OPTIONS, migrate=migrate), intent_hold)

    async def close(self) -> None:
        await self._db.close()

    @property
    def write_commits(self) -> int | None:
        """Commits the grouped writes took so far (None where each is a transaction of its own)."""
        return self._writes.commits

    async def record(self, entry: AuditEntry) -> None:
        await self._writes.run(
            lambda tx: tx.execute(
                "INSERT INTO audit (time_us, action, device_id, caller, request_id, outcome, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                _row(entry),
            )
        )

    async def begin_intent(self, intent: ActivationIntent, entry: AuditEntry) -> ActivationIntent:
        """Record ``intent`` and its audit row ``entry`` durably, in one transaction."""
        return await self.intents.begin(intent, _row(entry))

    async def record_refusal(self, refusal: Refusal) -> None:
        await self.record(
            AuditEntry(
                refusal.time,
                refusal.method,
                refusal.device_id,
                refusal.caller,
                refusal.request_id,
                "refused",
                refusal.detail,
            )
        )

    async def entries(self, device_id: str | None = None) -> list[AuditEntry]:
        async def go(tx: Tx) -> list[AuditEntry]:
            sql = "SELECT time_us, action, device_id, caller, request_id, outcome, detail FROM audit"
            rows = (
                await tx.fetchall(sql + " WHERE device_id = ? ORDER BY id", (device_id,))
                if device_id
                else await tx.fetchall(sql + " ORDER BY id")
            )
            return [AuditEntry(datetime.fromtimestamp(r[0] / 1_000_000, UTC), *r[1:]) for r in rows]

        return await self._db.read(go)

    async def find_request(self, request_id: str) -> tuple[str, str] | None:
        async def go(tx: Tx) -> tuple[str, str] | None:
            row = await tx.fetchone(
                "SELECT fingerprint, response FROM activation_requests WHERE request_id = ?", (request_id,)
            )
            return (row[0], row[1]) if row else None

        return await self._db.read(go)

    async def remember_request(self, request_id: str, fingerprint: str, response: str) -> bool:
        """Store the answer of ``request_id`` and end its reservation, together; False (nothing written)
        when the id has an answer already."""

        async def go(tx: Tx) -> bool:
            stored = await tx.execute(
                "INSERT INTO activation_requests (request_id, fingerprint, response) "
                "VALUES (?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
                (request_id, fingerprint, response),
            )
            if stored:
                await reservations.settle(tx, RESERVATIONS, request_id)
            return stored == 1

        return await self._writes.run(go)
