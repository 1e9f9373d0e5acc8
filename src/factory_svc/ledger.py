"""The ledger database, and the stores that share it: wiring, no rules of its own.

One database holds what the factory issued and decided: the certificates and MintCertificate's request ids
(``factory_svc.mint.store``), revocations, their intents and the CRL state (``factory_svc.revocation.store``),
production lots (``factory_svc.lots.store``), and the calls the server refused before any factory code ran
(no party identity, or a role the access table does not allow, see ``provkit.authz``): the ``refusals``
table (``RefusalStore``), the factory's trail of who tried what: the first refusal of each kind, and a
summary row per window of its repeats (``provkit.refusal_audit``; a row with ``repeats`` N stands for N).
Its migrations are declared here once, in order, and never edited (a file of any earlier version opens
unchanged); ``Ledger`` opens the database and hands it to each store.

File: ``<data_dir>/ledger.sqlite3`` (plus its ``-wal``/``-shm`` companions).  On PostgreSQL (the service's
``database_url``, shared by replicas) the same tables live in that database.

Versions: 1 the original tables; 2 revocation (the marks on ``certificates`` and the ``revocations`` audit);
3 production lots (``lots`` and ``lot_items``); 4 MintCertificate request ids reserved before the work
(``mint_reservations``); 5 revocation intents and the CRL state every replica shares; 6 renewals
(``factory_svc.renewal.store``: the ``renewals`` intents, ``certificates.replaces`` / ``superseded_by``);
7 summaries of repeated refusals (``refusals.repeats`` / ``until_us``, ``provkit.refusal_audit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dbstore import Database, DatabaseUrl, open_database, reservations
from factory_svc.lots.store import LotStore
from factory_svc.mint.store import RESERVATIONS, CertificateStore
from factory_svc.renewal.store import MIGRATION as RENEWALS
from factory_svc.renewal.store import RenewalStore
from factory_svc.revocation.store import RevocationStore
from litestore import Options, Schema, Synchronous
from provkit.authz import Refusal
from provkit.clock import from_us, to_us

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

# Version 4: MintCertificate request ids reserved before the work, for replicas (``dbstore.reservations``,
# table ``factory_svc.mint.store.RESERVATIONS``).

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

# Version 7: a refusals row may stand for many (``provkit.refusal_audit``): ``repeats`` more refusals of the
# kind of the row, between ``time_us`` and ``until_us`` (0 and NULL: the row is one refusal).
REFUSAL_REPEATS = """
ALTER TABLE refusals ADD COLUMN repeats INTEGER NOT NULL DEFAULT 0;
ALTER TABLE refusals ADD COLUMN until_us INTEGER;
"""

# Version 1 is the original schema (files written before versions were kept have version 0 and these tables).
MIGRATIONS = (
    SCHEMA,
    REVOCATION,
    LOTS,
    reservations.migration(RESERVATIONS),
    REVOCATION_INTENTS,
    RENEWALS,
    REFUSAL_REPEATS,
)
# FULL: a certificate handed out must stay on record (limits and audits count it) even after a power cut.
# One statement cache entry per multi-row INSERT size.
OPTIONS = Options(synchronous=Synchronous.FULL, cached_statements=512)
SCHEMA_VERSIONS = Schema("ledger", MIGRATIONS)
FILE = "ledger.sqlite3"


class RefusalStore:
    """``refusals``: the calls the server refused before any factory code ran
    (``provkit.authz.RefusalLog``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def record_refusal(self, refusal: Refusal) -> None:
        row = (
            to_us(refusal.time),
            refusal.method,
            refusal.caller,
            refusal.role,
            refusal.device_id,
            refusal.request_id,
            refusal.reason,
            refusal.repeats,
            None if refusal.until is None else to_us(refusal.until),
        )
        await self._db.transaction(
            lambda tx: tx.execute(
                "INSERT INTO refusals (time_us, method, caller, role, device_id, request_id, reason, "
                "repeats, until_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        )

    async def recorded(self) -> list[Refusal]:
        """Every row, oldest first: a refusal, or a summary of ``repeats`` more of its kind."""
        rows = await self._db.read(
            lambda tx: tx.fetchall(
                "SELECT time_us, method, caller, role, device_id, request_id, reason, repeats, until_us "
                "FROM refusals ORDER BY id"
            )
        )
        return [
            Refusal(
                from_us(r[0]),
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                repeats=r[7],
                until=None if r[8] is None else from_us(r[8]),
            )
            for r in rows
        ]


@dataclass(frozen=True)
class Ledger:
    """The ledger database and the stores on it (closing the ledger closes the database)."""

    database: Database
    certificates: CertificateStore
    revocations: RevocationStore
    lots: LotStore
    refusals: RefusalStore
    renewals: RenewalStore

    @classmethod
    def on(cls, db: Database) -> Ledger:
        return cls(
            db, CertificateStore(db), RevocationStore(db), LotStore(db), RefusalStore(db), RenewalStore(db)
        )

    @classmethod
    async def open(cls, where: Path | DatabaseUrl, *, migrate: bool = False) -> Ledger:
        """``where``: the SQLite file, or the service's database URL (see ``dbstore.open_database``)."""
        return cls.on(await open_database(where, FILE, SCHEMA_VERSIONS, OPTIONS, migrate=migrate))

    async def close(self) -> None:
        await self.database.close()
