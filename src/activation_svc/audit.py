"""The activation audit trail: one durable SQLite row per Activate / Deactivate attempt, with the caller.

File ``<data_dir>/audit.sqlite3``, table ``audit(time_us, action, device_id, caller, request_id, outcome,
detail)``.  Written before the answer is sent.  Activation codes and metadata values are never recorded
(the metadata's SHA-256 is).  Calls the server refused before the service ran (``provkit.authz``) are
rows too: ``record_refusal`` writes action = the RPC's path, outcome ``refused``, detail = reason and role.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

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


@dataclass(frozen=True)
class AuditEntry:
    time: datetime
    action: str
    device_id: str
    caller: str
    request_id: str
    outcome: str
    detail: str


class AuditLog:
    def __init__(self, db: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._db = db
        self._executor = executor

    @classmethod
    async def open(cls, path: Path) -> AuditLog:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")

        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            return db

        return cls(await asyncio.get_running_loop().run_in_executor(executor, connect), executor)

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)

    async def record(self, entry: AuditEntry) -> None:
        await self._run(
            self._db.execute,
            "INSERT INTO audit (time_us, action, device_id, caller, request_id, outcome, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                int(entry.time.timestamp() * 1_000_000),
                entry.action,
                entry.device_id,
                entry.caller,
                entry.request_id,
                entry.outcome,
                entry.detail,
            ),
        )

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
        def go() -> list[AuditEntry]:
            sql = "SELECT time_us, action, device_id, caller, request_id, outcome, detail FROM audit"
            rows = (
                self._db.execute(sql + " WHERE device_id = ? ORDER BY id", (device_id,))
                if device_id
                else self._db.execute(sql + " ORDER BY id")
            ).fetchall()
            return [
                AuditEntry(datetime.fromtimestamp(r[0] / 1_000_000, UTC), *r[1:])  # type: ignore[arg-type]
                for r in rows
            ]

        return await self._run(go)

    async def find_request(self, request_id: str) -> tuple[str, str] | None:
        def go() -> tuple[str, str] | None:
            row = self._db.execute(
                "SELECT fingerprint, response FROM activation_requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            return (row[0], row[1]) if row else None

        return await self._run(go)

    async def remember_request(self, request_id: str, fingerprint: str, response: str) -> None:
        await self._run(
            self._db.execute,
            "INSERT OR IGNORE INTO activation_requests (request_id, fingerprint, response) VALUES (?, ?, ?)",
            (request_id, fingerprint, response),
        )
