"""The wrong-code limit of ``activation_svc.ratelimit``, kept in the database for several replicas.

Same rule, same numbers (per caller+device: ``free_failures``, then one attempt at a time after a doubling
back-off), but the counts are rows that every replica sees, and every decision about a device is taken
holding that device's row locked (``SELECT ... FOR UPDATE`` on ``wrong_code_devices``): so N admitted means
N checked, counted exactly across replicas.  An admitted check is a row with a lease (``CHECK_LEASE``): when
its replica dies before reporting, the slot comes back when the lease runs out.  Where the in-memory limiter
waits for a future, a replica here polls (``POLL``) until the checks in flight have reported.

Tables (the audit store's schema version 3, ``MIGRATION``, on both backends; only PostgreSQL uses them):
``wrong_code_devices`` (the lock), ``wrong_code_pairs`` (failures and back-off per caller+device),
``wrong_code_checks`` (checks in flight).  Version 6 (``DROP_DEVICE_CEILING``) drops
``wrong_code_failures``, the per-device window of the ceiling over all callers that let anyone lock the
owner out (removed: see ``activation_svc.ratelimit``).

API: :class:`FailureLimits` (the port the service uses), :class:`MemoryLimits` (the in-memory limiter
behind it), :class:`DatabaseLimits` (these tables), :func:`failure_limits` (the one for a database).
The portal's per-address limit (``activation_svc.portal.app``, device ``*``: over all devices) goes through
the same port, on these tables when the service's database is PostgreSQL.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from activation_svc.ratelimit import Attempt, AttemptLimiter, AttemptsExhausted, backoff, seconds_of
from dbstore import Database, Tx
from provkit.clock import Clock, from_us, to_us

MIGRATION = """
CREATE TABLE wrong_code_devices (device_id TEXT PRIMARY KEY);
CREATE TABLE wrong_code_pairs (
    caller TEXT NOT NULL,
    device_id TEXT NOT NULL,
    failures INTEGER NOT NULL,
    last_failure_us INTEGER NOT NULL,
    next_allowed_us INTEGER NOT NULL,
    PRIMARY KEY (caller, device_id)
);
CREATE TABLE wrong_code_failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    at_us INTEGER NOT NULL
);
CREATE INDEX wrong_code_failures_by_device ON wrong_code_failures (device_id, at_us);
CREATE TABLE wrong_code_checks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    caller TEXT NOT NULL,
    device_id TEXT NOT NULL,
    expires_us INTEGER NOT NULL
);
CREATE INDEX wrong_code_checks_by_device ON wrong_code_checks (device_id, caller);
"""
DROP_DEVICE_CEILING = """
DROP INDEX wrong_code_failures_by_device;
DROP TABLE wrong_code_failures;
"""

CHECK_LEASE = timedelta(minutes=2)  # far longer than a code check (one DPS read and a hash)
POLL = 0.05  # seconds between looks while the checks in flight decide


class Slot(Protocol):
    """One admitted code check: report ``failed`` or ``succeeded`` once; ``release`` (always call it, e.g.
    in ``finally``) gives the slot back uncounted when neither was reported."""

    async def failed(self) -> None: ...

    async def succeeded(self) -> None: ...

    async def release(self) -> None: ...


class FailureLimits(Protocol):
    async def begin(self, caller_key: str, device_id: str) -> Slot:
        """Admit one code check, or raise ``AttemptsExhausted`` (nothing counted then)."""
        ...


class _MemorySlot:
    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt

    async def failed(self) -> None:
        self._attempt.failed()

    async def succeeded(self) -> None:
        self._attempt.succeeded()

    async def release(self) -> None:
        self._attempt.__exit__(None, None, None)


class MemoryLimits:
    """The in-memory limiter (one process) behind the port."""

    def __init__(self, limiter: AttemptLimiter) -> None:
        self.limiter = limiter

    async def begin(self, caller_key: str, device_id: str) -> Slot:
        return _MemorySlot(await self.limiter.begin(caller_key, device_id))


@dataclass(frozen=True)
class _Wait:
    """The pair's checks in flight decide whether there is room: look again soon."""


async def _lock_device(tx: Tx, device_id: str) -> None:
    await tx.execute(
        "INSERT INTO wrong_code_devices (device_id) VALUES (?) ON CONFLICT DO NOTHING", (device_id,)
    )
    await tx.fetchone(
        "SELECT device_id FROM wrong_code_devices WHERE device_id = ? FOR UPDATE", (device_id,)
    )


async def _count(tx: Tx, sql: str, params: tuple[object, ...]) -> int:
    row = await tx.fetchone(sql, params)
    return int(row[0]) if row else 0


class _DatabaseSlot:
    def __init__(self, limits: DatabaseLimits, check_id: int, caller: str, device_id: str) -> None:
        self._limits = limits
        self._id = check_id
        self._caller = caller
        self._device = device_id
        self._open = True

    async def _settle(self, outcome: str) -> None:
        if not self._open:
            return
        self._open = False
        await self._limits._settle(self._id, self._caller, self._device, outcome)

    async def failed(self) -> None:
        await self._settle("failed")

    async def succeeded(self) -> None:
        await self._settle("succeeded")

    async def release(self) -> None:
        await self._settle("released")


@dataclass(frozen=True)
class Rules:
    """The numbers of the limit (see ``activation_svc.ratelimit``)."""

    free_failures: int = 5
    window: timedelta = timedelta(minutes=15)
    base_delay: timedelta = timedelta(seconds=2)
    max_delay: timedelta = timedelta(minutes=15)


class DatabaseLimits:
    def __init__(self, db: Database, *, clock: Clock, rules: Rules = Rules()) -> None:
        self._db = db
        self._clock = clock
        self._free = rules.free_failures
        self._base = rules.base_delay
        self._max = rules.max_delay
        self._window = rules.window

    async def begin(self, caller_key: str, device_id: str) -> Slot:
        while True:
            decision = await self._db.transaction(
                functools.partial(self._decide, caller=caller_key, device_id=device_id, now=self._clock())
            )
            if isinstance(decision, int):
                return _DatabaseSlot(self, decision, caller_key, device_id)
            if isinstance(decision, AttemptsExhausted):
                raise decision
            await asyncio.sleep(POLL)

    async def _decide(
        self, tx: Tx, *, caller: str, device_id: str, now: datetime
    ) -> int | AttemptsExhausted | _Wait:
        """Under the device's lock: a new check's id, a refusal, or wait."""
        now_us = to_us(now)
        await _lock_device(tx, device_id)
        await tx.execute(
            "DELETE FROM wrong_code_checks WHERE device_id = ? AND expires_us <= ?", (device_id, now_us)
        )
        pair = await tx.fetchone(
            "SELECT failures, last_failure_us, next_allowed_us FROM wrong_code_pairs "
            "WHERE caller = ? AND device_id = ?",
            (caller, device_id),
        )
        failures, next_allowed_us = 0, 0
        if pair is not None:
            if now - from_us(int(pair[1])) >= max(self._window, self._max):  # idle: forgotten
                await tx.execute(
                    "DELETE FROM wrong_code_pairs WHERE caller = ? AND device_id = ?", (caller, device_id)
                )
            else:
                failures, next_allowed_us = int(pair[0]), int(pair[2])
        in_flight = await _count(
            tx,
            "SELECT count(*) FROM wrong_code_checks WHERE device_id = ? AND caller = ?",
            (device_id, caller),
        )
        if failures + in_flight >= self._free:
            if in_flight:  # past the free failures one attempt at a time
                return _Wait()
            if now_us < next_allowed_us:
                return AttemptsExhausted(seconds_of(from_us(next_allowed_us) - now))
        return await tx.insert(
            "INSERT INTO wrong_code_checks (caller, device_id, expires_us) VALUES (?, ?, ?)",
            (caller, device_id, to_us(now + CHECK_LEASE)),
            "id",
        )

    async def _settle(self, check_id: int, caller: str, device_id: str, outcome: str) -> None:
        now = self._clock()

        async def go(tx: Tx) -> None:
            await _lock_device(tx, device_id)
            await tx.execute("DELETE FROM wrong_code_checks WHERE id = ?", (check_id,))
            if outcome == "succeeded":
                await tx.execute(
                    "DELETE FROM wrong_code_pairs WHERE caller = ? AND device_id = ?", (caller, device_id)
                )
            if outcome != "failed":
                return
            failures = 1 + await _count(
                tx,
                "SELECT coalesce(max(failures), 0) FROM wrong_code_pairs WHERE caller = ? AND device_id = ?",
                (caller, device_id),
            )
            next_allowed = now + backoff(failures, self._free, self._base, self._max)
            await tx.execute(
                "INSERT INTO wrong_code_pairs "
                "(caller, device_id, failures, last_failure_us, next_allowed_us) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (caller, device_id) DO UPDATE SET "
                "failures = excluded.failures, last_failure_us = excluded.last_failure_us, "
                "next_allowed_us = excluded.next_allowed_us",
                (caller, device_id, failures, to_us(now), to_us(next_allowed)),
            )

        await self._db.transaction(go)


def failure_limits(
    db: Database | None,
    *,
    clock: Clock,
    free_failures: int,
    window: timedelta = Rules.window,
) -> FailureLimits:
    """The limits for a program on ``db``: in the database on PostgreSQL (replicas), else (SQLite, or no
    database: the portal beside a service on SQLite) in memory."""
    if db is not None and db.shared:
        return DatabaseLimits(db, clock=clock, rules=Rules(free_failures, window))
    return MemoryLimits(AttemptLimiter(clock=clock, free_failures=free_failures, window=window))
