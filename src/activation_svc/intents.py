"""Activation intents: what an Activate is about to change outside this process, written durably first.

Before its first external write an Activate records an intent (device, caller, request id, hub, the
initial twin before and the one wanted, whether the metadata is kept, replaced or cleared, the owner to
claim, the enrollment etag it read) and, in the same
transaction, its audit row (outcome ``pending``).  Each step is marked as it completes (``dps`` with the
new enrollment etag, then ``hub``); the intent is then ``done`` and its audit row ``ok``.  An intent whose
enrollment was changed by someone else before its own write is ``abandoned`` (audit row ``error``, reason
in the detail).  What a crash leaves ``open`` is finished by the service (``ActivationService.
complete_open_intents``): at start-up, and on the next call for that device.

Stored with the audit (table ``activation_intents``: the audit store's schema version 2, ``MIGRATION``),
on the audit log's database (``dbstore``: the SQLite file ``audit.sqlite3`` or the service's PostgreSQL
database), so an intent and its audit row are one transaction.  With several replicas on PostgreSQL, the
replica that finishes an open intent holds its row locked meanwhile (:meth:`IntentLog.claim`), so a
crashed replica's intents are finished by another one.  Holding is a lease: ``held_by`` (the intent
log's random id, one per process) and ``held_until_us`` (schema version 4, ``HOLD_MIGRATION``).  The
replica that begins an intent holds it while it carries it out; another replica's recovery takes only
intents nobody holds, or whose hold ran out (``HOLD``, far longer than the steps take: the replica died),
so two replicas never drive one intent at once.  (On SQLite one process serves: holds are not needed.)

The writes go through ``dbstore.grouped.GroupedTransactions``: on SQLite the intents, marks and audit
rows of concurrent activations share a commit (each still its own all-or-nothing write, answered once it
is durable); on PostgreSQL each is its own transaction.

API: ``ActivationIntent``; ``IntentLog(db, writes=None)``: ``begin(intent, audit_entry) -> ActivationIntent``
(with ids), ``mark_dps(id, etag)``, ``mark_hub(id)``, ``finish(intent, done, outcome, detail)`` (writes
the intent's step marks with its state, so a step followed by no other external write is marked by the
close), ``open_intents(device_id=None)``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from datetime import UTC, datetime, timedelta
from typing import Any

from activation_svc.model import MetadataChange
from dbstore import Database, Tx
from dbstore.grouped import GroupedTransactions
from provkit.cloud import InitialTwin

MIGRATION = """
CREATE TABLE activation_intents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    caller TEXT NOT NULL,
    request_id TEXT NOT NULL,
    hub TEXT NOT NULL,
    twin_before TEXT,
    twin_after TEXT NOT NULL,
    owner TEXT NOT NULL,
    basis_etag TEXT NOT NULL,
    summary TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'done', 'abandoned')),
    dps_etag TEXT,
    hub_done INTEGER NOT NULL DEFAULT 0,
    audit_id INTEGER NOT NULL,
    created_us INTEGER NOT NULL
);
CREATE INDEX activation_intents_open ON activation_intents (state, device_id, id);
"""


# Version 4 of the audit store: who is carrying an open intent out, until when.
HOLD_MIGRATION = """
ALTER TABLE activation_intents ADD COLUMN held_by TEXT NOT NULL DEFAULT '';
ALTER TABLE activation_intents ADD COLUMN held_until_us INTEGER NOT NULL DEFAULT 0;
"""
HOLD = timedelta(minutes=1)  # steps take seconds (DPS and hub calls time out well before)

# Version 6 of the audit store: what the intent does with the device's metadata (``MetadataChange``): an
# activation that KEEPS it leaves the hub twin's tags and desired properties alone.  Intents recorded
# before it replaced the metadata.
METADATA_MIGRATION = """
ALTER TABLE activation_intents ADD COLUMN metadata_change TEXT NOT NULL DEFAULT 'replaced';
"""


@dataclass(frozen=True)
class ActivationIntent:
    device_id: str
    caller: str
    request_id: str
    hub: str  # the hub allocated in the enrollment
    before: InitialTwin | None  # the enrollment's initial twin before (what the hub twin got from it)
    after: InitialTwin  # what must be there now
    owner: str  # the owner to claim when the enrollment names none ("" for none)
    basis_etag: str  # the enrollment etag the change is meant for
    summary: str  # "hub=... metadata_sha256=..." (or "metadata=kept"), for the audit detail
    metadata: MetadataChange = MetadataChange.REPLACED  # KEPT: the hub twin's metadata is left alone
    id: int = 0
    audit_id: int = 0
    dps_etag: str | None = None  # set when the enrollment step completed
    hub_done: bool = False
    created: datetime | None = None

    @property
    def dps_done(self) -> bool:
        return self.dps_etag is not None


def _twin_json(twin: InitialTwin | None) -> str | None:
    return None if twin is None else json.dumps({"tags": dict(twin.tags), "desired": dict(twin.desired)})


def _twin(text: str | None) -> InitialTwin | None:
    if text is None:
        return None
    data: dict[str, Any] = json.loads(text)
    return InitialTwin(data.get("tags") or {}, data.get("desired") or {})


_SELECT_OPEN = (
    "SELECT id, device_id, caller, request_id, hub, twin_before, twin_after, owner, basis_etag, summary, "
    "dps_etag, hub_done, audit_id, created_us, metadata_change FROM activation_intents WHERE state = 'open'"
)


def _intent(row: tuple[Any, ...]) -> ActivationIntent:
    return ActivationIntent(
        device_id=row[1],
        caller=row[2],
        request_id=row[3],
        hub=row[4],
        before=_twin(row[5]),
        after=_twin(row[6]) or InitialTwin(),
        owner=row[7],
        basis_etag=row[8],
        summary=row[9],
        id=row[0],
        dps_etag=row[10],
        hub_done=bool(row[11]),
        audit_id=row[12],
        created=datetime.fromtimestamp(row[13] / 1_000_000, UTC),
        metadata=MetadataChange(row[14]),
    )


class IntentLog:
    def __init__(
        self,
        db: Database,
        *,
        hold: timedelta = HOLD,
        clock: Callable[[], float] = time.time,
        writes: GroupedTransactions | None = None,
    ) -> None:
        self._db = db
        self._writes = writes or GroupedTransactions(db)
        self._hold_us = int(hold.total_seconds() * 1_000_000)
        self._clock = clock  # wall-clock seconds, for the holds only
        self.holder = secrets.token_hex(8)

    def _until_us(self) -> int:
        return int(self._clock() * 1_000_000) + self._hold_us

    async def hold(self, intent: ActivationIntent) -> bool:
        """Take (or renew) the hold of an open intent; False when it is closed or another replica's hold
        runs.  On a database of one process (SQLite) it finishes its own intents at once: always."""
        if not self._db.shared:
            return True
        now_us = int(self._clock() * 1_000_000)
        changed = await self._db.transaction(
            lambda tx: tx.execute(
                "UPDATE activation_intents SET held_by = ?, held_until_us = ? "
                "WHERE id = ? AND state = 'open' AND (held_by = ? OR held_until_us <= ?)",
                (self.holder, now_us + self._hold_us, intent.id, self.holder, now_us),
            )
        )
        return changed == 1

    async def let_go(self, intent: ActivationIntent) -> None:
        """Give up the hold of an intent left open (any replica may try it next)."""
        await self._writes.run(
            lambda tx: tx.execute(
                "UPDATE activation_intents SET held_by = '', held_until_us = 0 WHERE id = ? AND held_by = ?",
                (intent.id, self.holder),
            )
        )

    async def begin(self, intent: ActivationIntent, audit_row: tuple[Any, ...]) -> ActivationIntent:
        """Record ``intent`` and its audit row (time_us, action, device_id, caller, request_id, outcome,
        detail) in one transaction; the intent with its ids."""

        async def go(tx: Tx) -> ActivationIntent:
            audit_id = await tx.insert(
                "INSERT INTO audit (time_us, action, device_id, caller, request_id, outcome, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                audit_row,
                "id",
            )
            intent_id = await tx.insert(
                "INSERT INTO activation_intents (device_id, caller, request_id, hub, twin_before, "
                "twin_after, owner, basis_etag, summary, state, audit_id, created_us, held_by, "
                "held_until_us, metadata_change) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, ?, ?)",
                (
                    intent.device_id,
                    intent.caller,
                    intent.request_id,
                    intent.hub,
                    _twin_json(intent.before),
                    _twin_json(intent.after),
                    intent.owner,
                    intent.basis_etag,
                    intent.summary,
                    audit_id,
                    audit_row[0],
                    self.holder,
                    self._until_us(),
                    intent.metadata.value,
                ),
                "id",
            )
            return dc_replace(intent, id=intent_id, audit_id=audit_id)

        return await self._writes.run(go)

    async def mark_dps(self, intent: ActivationIntent, etag: str) -> ActivationIntent:
        await self._writes.run(
            lambda tx: tx.execute(
                "UPDATE activation_intents SET dps_etag = ? WHERE id = ?", (etag, intent.id)
            )
        )
        return dc_replace(intent, dps_etag=etag)

    async def mark_hub(self, intent: ActivationIntent) -> ActivationIntent:
        await self._writes.run(
            lambda tx: tx.execute("UPDATE activation_intents SET hub_done = 1 WHERE id = ?", (intent.id,))
        )
        return dc_replace(intent, hub_done=True)

    async def finish(self, intent: ActivationIntent, done: bool, outcome: str, detail: str) -> None:
        """Close the intent (``done`` or ``abandoned``) with its step marks as ``intent`` has them, and give
        its audit row its outcome, together."""

        async def go(tx: Tx) -> None:
            await tx.execute(
                "UPDATE activation_intents SET state = ?, dps_etag = ?, hub_done = ? WHERE id = ?",
                ("done" if done else "abandoned", intent.dps_etag, int(intent.hub_done), intent.id),
            )
            await tx.execute(
                "UPDATE audit SET outcome = ?, detail = ? WHERE id = ?", (outcome, detail, intent.audit_id)
            )

        await self._writes.run(go)

    async def note(self, intent: ActivationIntent, detail: str) -> None:
        """Say in the (still pending) audit row why the intent is not finished yet."""
        await self._writes.run(
            lambda tx: tx.execute("UPDATE audit SET detail = ? WHERE id = ?", (detail, intent.audit_id))
        )

    async def open_intents(self, device_id: str | None = None) -> list[ActivationIntent]:
        async def go(tx: Tx) -> list[ActivationIntent]:
            rows = (
                await tx.fetchall(_SELECT_OPEN + " AND device_id = ? ORDER BY id", (device_id,))
                if device_id is not None
                else await tx.fetchall(_SELECT_OPEN + " ORDER BY id")
            )
            return [_intent(r) for r in rows]

        return await self._db.read(go)
