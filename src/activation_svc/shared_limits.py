"""The wrong-code limit of ``activation_svc.ratelimit`` (its rule, :func:`~activation_svc.ratelimit.decide`
and :func:`~activation_svc.ratelimit.settle`), kept in the database for several replicas.

The counts are rows that every replica sees, and every decision about a device is taken holding that
device's row locked (``SELECT ... FOR UPDATE`` on ``wrong_code_devices``): so N admitted means N checked,
counted exactly across replicas.  An admitted check is a row with a lease (``CHECK_LEASE``): when its
replica dies before reporting, the slot comes back when the lease runs out.  Where the in-memory limiter
waits for a future, a replica here polls (``POLL``) until the checks in flight have reported.

Tables (the audit store's schema version 3, ``MIGRATION``, on both backends; only PostgreSQL uses them):
``wrong_code_devices`` (the lock), ``wrong_code_pairs`` (failures and back-off per caller+device),
``wrong_code_checks`` (checks in flight).  Version 6 (``DROP_DEVICE_CEILING``) drops
``wrong_code_failures``, the per-device window of the ceiling over all callers that let anyone lock the
owner out (removed: see ``activation_svc.ratelimit``).

API: :class:`DatabaseLimits` (these tables, behind ``activation_svc.ratelimit.FailureLimits``),
:func:`failure_limits` (the limits for a database: these, or ``ratelimit.MemoryLimits``).
The portal's per-address limit (``activation_svc.portal.app``, device ``*``: over all devices) goes through
the same port, on these tables when the service's database is PostgreSQL.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import datetime, timedelta

from activation_svc.ratelimit import (
    Admit,
    AttemptsExhausted,
    FailureLimits,
    MemoryLimits,
    Outcome,
    PairState,
    Refuse,
    Rules,
    SettleOnce,
    Slot,
    Wait,
    decide,
    settle,
)
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


async def _lock_device(tx: Tx, device_id: str) -> None:
    await tx.execute(
        "INSERT INTO wrong_code_devices (device_id) VALUES (?) ON CONFLICT DO NOTHING", (device_id,)
    )
    await tx.fetchone("SELECT device_id FROM wrong_code_devices WHERE device_id = ? FOR UPDATE", (device_id,))


async def _count(tx: Tx, sql: str, params: tuple[object, ...]) -> int:
    row = await tx.fetchone(sql, params)
    return int(row[0]) if row else 0


async def _pair(tx: Tx, caller: str, device_id: str) -> PairState:
    """The pair's row and its checks in flight (the device locked)."""
    row = await tx.fetchone(
        "SELECT failures, last_failure_us, next_allowed_us FROM wrong_code_pairs "
        "WHERE caller = ? AND device_id = ?",
        (caller, device_id),
    )
    in_flight = await _count(
        tx, "SELECT count(*) FROM wrong_code_checks WHERE caller = ? AND device_id = ?", (caller, device_id)
    )
    if row is None:
        return PairState(in_flight=in_flight)
    return PairState(int(row[0]), in_flight, from_us(int(row[1])), from_us(int(row[2])))


async def _store_pair(tx: Tx, caller: str, device_id: str, pair: PairState) -> None:
    if not pair.failures or pair.last_failure is None or pair.next_allowed is None:
        await tx.execute(
            "DELETE FROM wrong_code_pairs WHERE caller = ? AND device_id = ?", (caller, device_id)
        )
        return
    await tx.execute(
        "INSERT INTO wrong_code_pairs "
        "(caller, device_id, failures, last_failure_us, next_allowed_us) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (caller, device_id) DO UPDATE SET "
        "failures = excluded.failures, last_failure_us = excluded.last_failure_us, "
        "next_allowed_us = excluded.next_allowed_us",
        (caller, device_id, pair.failures, to_us(pair.last_failure), to_us(pair.next_allowed)),
    )


class DatabaseLimits:
    def __init__(self, db: Database, *, clock: Clock, rules: Rules) -> None:
        self._db = db
        self._clock = clock
        self.rules = rules

    async def begin(self, caller_key: str, device_id: str) -> Slot:
        while True:
            decision = await self._db.transaction(
                functools.partial(self._decide, caller=caller_key, device_id=device_id, now=self._clock())
            )
            if isinstance(decision, int):
                return SettleOnce(functools.partial(self._settle, decision, caller_key, device_id))
            if isinstance(decision, Refuse):
                raise AttemptsExhausted(decision.retry_after)
            await asyncio.sleep(POLL)

    async def _decide(self, tx: Tx, *, caller: str, device_id: str, now: datetime) -> int | Refuse | Wait:
        """Under the device's lock: a new check's id, a refusal, or wait."""
        await _lock_device(tx, device_id)
        await tx.execute(
            "DELETE FROM wrong_code_checks WHERE device_id = ? AND expires_us <= ?", (device_id, to_us(now))
        )
        pair = await _pair(tx, caller, device_id)
        if self.rules.idle(pair.last_failure, now):  # forgotten
            await _store_pair(tx, caller, device_id, PairState())
            pair = PairState(in_flight=pair.in_flight)
        decision = decide(self.rules, pair, now)
        if not isinstance(decision, Admit):
            return decision
        return await tx.insert(
            "INSERT INTO wrong_code_checks (caller, device_id, expires_us) VALUES (?, ?, ?)",
            (caller, device_id, to_us(now + CHECK_LEASE)),
            "id",
        )

    async def _settle(self, check_id: int, caller: str, device_id: str, outcome: Outcome) -> None:
        now = self._clock()

        async def go(tx: Tx) -> None:
            await _lock_device(tx, device_id)
            if outcome is not Outcome.RELEASED:
                pair = await _pair(tx, caller, device_id)
                await _store_pair(tx, caller, device_id, settle(self.rules, pair, outcome, now))
            await tx.execute("DELETE FROM wrong_code_checks WHERE id = ?", (check_id,))

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
    return MemoryLimits(clock=clock, rules=Rules(free_failures, window))
