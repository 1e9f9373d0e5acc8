"""The activation audit trail: one durable SQLite row per Activate / Deactivate attempt, with the caller.

File ``<data_dir>/audit.sqlite3``, table ``audit(time_us, action, device_id, caller, request_id, outcome,
detail)``.  Written before the answer is sent.  Activation codes and metadata values are never recorded
(the metadata's SHA-256 is).  Calls the server refused before the service ran (``provkit.authz``) are
rows too: ``record_refusal`` writes action = the RPC's path, outcome ``refused``, detail = reason and role.
An Activate that changes something outside writes its row when it records its intent (outcome ``pending``,
``activation_svc.intents``, same file and transaction) and gives it its outcome when the intent is
finished: ``ok``, or ``error`` with the reason; a row still ``pending`` is a change not completed yet.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from activation_svc.intents import MIGRATION as INTENTS_MIGRATION
from activation_svc.intents import ActivationIntent, IntentLog
from litestore import Options, Schema, Store, Synchronous
from provkit.authz import Refusal

T = TypeVar("T")

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
MIGRATIONS = (SCHEMA, INTENTS_MIGRATION)
# FULL: an audit row is written before the answer is sent; it must not vanish with a power cut after that.
OPTIONS = Options(synchronous=Synchronous.FULL)


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
    def __init__(self, store: Store) -> None:
        self._store = store
        self.intents = IntentLog(store)

    @classmethod
    async def open(cls, path: Path) -> AuditLog:
        return cls(await Store.open(path, Schema("audit", MIGRATIONS), OPTIONS))

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._store.run(fn)

    async def close(self) -> None:
        await self._store.close()

    async def record(self, entry: AuditEntry) -> None:
        await self._run(
            lambda db: db.execute(
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
        def go(db: sqlite3.Connection) -> list[AuditEntry]:
            sql = "SELECT time_us, action, device_id, caller, request_id, outcome, detail FROM audit"
            rows = (
                db.execute(sql + " WHERE device_id = ? ORDER BY id", (device_id,))
                if device_id
                else db.execute(sql + " ORDER BY id")
            ).fetchall()
            return [
                AuditEntry(datetime.fromtimestamp(r[0] / 1_000_000, UTC), *r[1:])
                for r in rows
            ]

        return await self._run(go)

    async def find_request(self, request_id: str) -> tuple[str, str] | None:
        def go(db: sqlite3.Connection) -> tuple[str, str] | None:
            row = db.execute(
                "SELECT fingerprint, response FROM activation_requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            return (row[0], row[1]) if row else None

        return await self._run(go)

    async def remember_request(self, request_id: str, fingerprint: str, response: str) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR IGNORE INTO activation_requests (request_id, fingerprint, response) "
                "VALUES (?, ?, ?)",
                (request_id, fingerprint, response),
            )
        )
