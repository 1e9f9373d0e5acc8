"""Group mode's device registry: the per-device records that individual enrollments hold in DPS in
individual mode, kept in a database both services reach instead (``docs/group-mode.md`` says why).

``ProvisioningMode``: ``individual`` (the default: one DPS individual enrollment per device) or ``group``
(one DPS enrollment group over the factory's CA; each device's record here, and activation_svc answers
DPS's custom allocation webhook from it).  ``provisioning_mode(source)`` reads the ``mode`` setting,
``registry_url(source, default)`` the ``registry.database_url`` one.

``DeviceRegistry`` implements ``provkit.cloud.EnrollmentPort`` (get / create / update / bulk_create /
bulk_update), so Enroll, EnrollBatch, the outbox, revocation, renewal, Activate, Deactivate and the status
read and write it exactly as they read and write DPS: the same ``provkit.cloud.Enrollment`` records,
stored as the very JSON DPS would hold (``provkit.dps_json``), guarded by an etag that changes with every
write.  Beside it, what DPS keeps about a registration: ``record_assignment`` (the hub the allocation
webhook placed the device on) is read back as the record's ``registration_state`` and, as on DPS, does
not change the record's etag (a registration never makes an activation lose its etag race).  The
assignments of concurrent allocations share commits (``dbstore.grouped``: one fsync on SQLite, one
transaction per group of this process on PostgreSQL), each still durable before its caller goes on.

Storage (``dbstore``): table ``registry(registration_id PRIMARY KEY, etag, document, updated_us,
assigned_hub, assigned_us)``; SQLite file ``registry.sqlite3`` in the URL's directory (two processes may
share it: every write is one ``BEGIN IMMEDIATE`` transaction, a conditional ``UPDATE``), or a PostgreSQL
database (``activation-svc migrate`` creates the table).  A database that cannot be reached or read
raises ``CloudUnavailable`` (the outbox queues, the webhook answers 503), never a wrong answer; on
PostgreSQL after at most ``WAIT`` seconds without a connection (psycopg_pool reconnects with its
exponential back-off, so the first calls after an outage may still fail for about as long as it lasted).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from dbstore import Conflict, Database, DatabaseUrl, Tx, UrlError, open_database
from dbstore.grouped import GroupedTransactions
from litestore import Options, Schema, Synchronous
from provkit.cloud import (
    BulkItemError,
    CloudAlreadyExists,
    CloudEtagMismatch,
    CloudNotFound,
    CloudUnavailable,
    Enrollment,
)
from provkit.dps_json import enrollment_from_json, enrollment_to_json
from provkit.settings import SettingsError, SettingsSource

T = TypeVar("T")

FILE = "registry.sqlite3"
SCHEMA = Schema(
    "registry",
    (
        """
        CREATE TABLE IF NOT EXISTS registry (
            registration_id TEXT PRIMARY KEY,
            etag TEXT NOT NULL,
            document TEXT NOT NULL,
            updated_us INTEGER NOT NULL,
            assigned_hub TEXT,
            assigned_us INTEGER
        );
        """,
    ),
)
# FULL: a record is written before Enroll or Activate answers; a power cut must not take it back.
OPTIONS = Options(synchronous=Synchronous.FULL)
# PostgreSQL away: a call fails (CloudUnavailable) after this many seconds without a connection, well
# inside the time DPS gives the webhook (the emulator's default: 10 s), so DPS hears 503 and retries, and
# Enroll queues in the outbox instead of holding its caller (the pool's default wait is 30 s).
WAIT = 3.0


class ProvisioningMode(enum.Enum):
    INDIVIDUAL = "individual"
    GROUP = "group"


def provisioning_mode(source: SettingsSource) -> ProvisioningMode:
    text = (source.text("mode") or ProvisioningMode.INDIVIDUAL.value).strip().lower()
    try:
        return ProvisioningMode(text)
    except ValueError:
        raise SettingsError(f"{source.describe('mode')} must be individual or group, got {text!r}") from None


def registry_url(source: SettingsSource, default: DatabaseUrl | None) -> DatabaseUrl | None:
    """``registry.database_url`` (a secret: it may hold a password; or ``..._FILE``), else ``default``."""
    secret = source.secret("registry.database_url")
    if secret is None:
        return default
    try:
        return DatabaseUrl.parse(secret.reveal().strip())
    except UrlError as exc:
        raise SettingsError(f"{source.env_name('registry.database_url')}: {exc}") from None


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [sqlite3.DatabaseError, OSError]
    try:
        import psycopg
        import psycopg_pool

        kinds += [psycopg.OperationalError, psycopg_pool.PoolTimeout]
    except ImportError:  # pragma: no cover - installed with dbstore
        pass
    return tuple(kinds)


_UNAVAILABLE = _unavailable_errors()


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _moment(micros: int | None) -> str | None:
    if micros is None:
        return None
    return datetime.fromtimestamp(micros / 1_000_000, UTC).isoformat().replace("+00:00", "Z")


def _new_etag() -> str:
    return f'"{uuid.uuid4().hex}"'


def _document(enrollment: Enrollment) -> str:
    return json.dumps(enrollment_to_json(enrollment), separators=(",", ":"), sort_keys=True)


_SELECT = (
    "SELECT document, etag, updated_us, assigned_hub, assigned_us FROM registry WHERE registration_id = ?"
)
_UPDATE = "UPDATE registry SET etag = ?, document = ?, updated_us = ? WHERE registration_id = ?"


def _record(registration_id: str, row: tuple[Any, ...]) -> Enrollment:
    document, etag, updated_us, hub, assigned_us = row
    body = json.loads(document)
    body["etag"] = etag
    body["lastUpdatedDateTimeUtc"] = _moment(updated_us)
    if hub:
        body["registrationState"] = {
            "registrationId": registration_id,
            "status": "assigned",
            "assignedHub": hub,
            "deviceId": body.get("deviceId") or registration_id,
            "lastUpdatedDateTimeUtc": _moment(assigned_us),
        }
    return enrollment_from_json(body, registration_id)


async def _written(tx: Tx, registration_id: str) -> Enrollment:
    """The record as the write in ``tx`` left it (read in the same transaction: a write that commits just
    after it must not pass for this one, with its etag)."""
    row = await tx.fetchone(_SELECT, (registration_id.lower(),))
    if row is None:  # pragma: no cover - the write in this transaction made or found it
        raise CloudNotFound(f"the record of {registration_id} is gone", status=404)
    return _record(registration_id, row)


class DeviceRegistry:
    """The per-device records of group mode (an ``EnrollmentPort``)."""

    def __init__(self, db: Database, clock: Callable[[], datetime] | None = None) -> None:
        self._db = db
        self._clock = clock or (lambda: datetime.now(UTC))
        # The allocation webhook's writes: many devices boot at once, and each assignment is its own work
        # in a shared commit (one that fails alone leaves nothing and fails alone).
        self._assignments = GroupedTransactions(db)

    @classmethod
    async def open(
        cls, where: DatabaseUrl, *, migrate: bool = False, clock: Callable[[], datetime] | None = None
    ) -> DeviceRegistry:
        return cls(await open_database(where, FILE, SCHEMA, OPTIONS, migrate=migrate, wait=WAIT), clock)

    async def close(self) -> None:
        await self._db.close()

    async def _run(self, work: Callable[[], Awaitable[T]], what: str) -> T:
        try:
            return await work()
        except _UNAVAILABLE as exc:
            raise CloudUnavailable(f"the device registry cannot {what}: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------------------------- reading
    async def get(self, registration_id: str) -> Enrollment | None:
        key = registration_id.lower()

        async def read(tx: Tx) -> Enrollment | None:
            row = await tx.fetchone(_SELECT, (key,))
            return None if row is None else _record(registration_id, row)

        return await self._run(lambda: self._db.read(read), "be read")

    # ------------------------------------------------------------------------------------- writing
    async def _insert(self, tx: Tx, enrollment: Enrollment) -> str:
        etag = _new_etag()
        await tx.execute(
            "INSERT INTO registry (registration_id, etag, document, updated_us) VALUES (?, ?, ?, ?)",
            (enrollment.registration_id.lower(), etag, _document(enrollment), _micros(self._clock())),
        )
        return etag

    async def _replace(self, tx: Tx, enrollment: Enrollment) -> str:
        """The record replaced when its etag still is ``enrollment.etag`` (``*`` or none: any)."""
        key = enrollment.registration_id.lower()
        etag = _new_etag()
        params: list[object] = [etag, _document(enrollment), _micros(self._clock()), key]
        if enrollment.etag and enrollment.etag != "*":
            changed = await tx.execute(_UPDATE + " AND etag = ?", [*params, enrollment.etag])
        else:
            changed = await tx.execute(_UPDATE, params)
        if changed:
            return etag
        if await tx.fetchone("SELECT 1 FROM registry WHERE registration_id = ?", (key,)) is None:
            raise CloudNotFound(f"no record for {enrollment.registration_id}", status=404)
        raise CloudEtagMismatch(f"the record of {enrollment.registration_id} changed meanwhile", status=412)

    async def create(self, enrollment: Enrollment) -> Enrollment:
        async def write(tx: Tx) -> Enrollment:
            try:
                await self._insert(tx, enrollment)
            except Conflict:
                raise CloudAlreadyExists(
                    f"{enrollment.registration_id} is recorded already", status=409
                ) from None
            return await _written(tx, enrollment.registration_id)

        return await self._run(lambda: self._db.transaction(write), "be written")

    async def update(self, enrollment: Enrollment) -> Enrollment:
        async def write(tx: Tx) -> Enrollment:
            await self._replace(tx, enrollment)
            return await _written(tx, enrollment.registration_id)

        return await self._run(lambda: self._db.transaction(write), "be written")

    async def bulk_create(self, enrollments: Sequence[Enrollment]) -> list[BulkItemError]:
        async def write(tx: Tx) -> list[BulkItemError]:
            errors: list[BulkItemError] = []
            for enrollment in enrollments:
                try:
                    async with tx.savepoint():
                        await self._insert(tx, enrollment)
                except Conflict:
                    exists = CloudAlreadyExists(
                        f"{enrollment.registration_id} is recorded already", status=409
                    )
                    errors.append(BulkItemError(enrollment.registration_id, exists))
            return errors

        return await self._run(lambda: self._db.transaction(write), "be written")

    async def bulk_update(self, enrollments: Sequence[Enrollment]) -> list[BulkItemError]:
        async def write(tx: Tx) -> list[BulkItemError]:
            errors: list[BulkItemError] = []
            for enrollment in enrollments:
                try:
                    await self._replace(tx, enrollment)
                except (CloudEtagMismatch, CloudNotFound) as exc:
                    mismatch = CloudEtagMismatch(str(exc), status=412)
                    errors.append(BulkItemError(enrollment.registration_id, mismatch))
            return errors

        return await self._run(lambda: self._db.transaction(write), "be written")

    # -------------------------------------------------------------------------------- registrations
    async def record_assignment(self, registration_id: str, hub: str) -> None:
        """The allocation placed the device on ``hub`` (its ``registration_state``; the etag stays), durable
        when this returns; concurrent calls share a commit."""

        async def write(tx: Tx) -> None:
            await tx.execute(
                "UPDATE registry SET assigned_hub = ?, assigned_us = ? WHERE registration_id = ?",
                (hub, _micros(self._clock()), registration_id.lower()),
            )

        await self._run(lambda: self._assignments.run(write), "be written")

    @property
    def assignment_commits(self) -> int | None:
        """Commits the assignments took so far (None where each is a transaction of its own)."""
        return self._assignments.commits

    async def count(self) -> int:
        async def read(tx: Tx) -> int:
            row = await tx.fetchone("SELECT COUNT(*) FROM registry")
            return int(row[0]) if row else 0

        return await self._run(lambda: self._db.read(read), "be read")
