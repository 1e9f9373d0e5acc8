"""Request-id idempotency (AIP-155) for every mutating RPC, written once.

A caller may send an optional ``request_id``.  A retry with the same id and the same request returns the
first answer and does nothing twice; the same id with a different request is refused with
``InvalidArgument`` reason ``REQUEST_ID_REUSED`` (metadata ``request_id``): a client error, the caller
must pick a fresh id (AIP-155).  A malformed id is ``InvalidArgument`` ``REQUEST_ID_INVALID`` (field
``request_id``).

The helper owns the fingerprint of a request, the per-id lock, the reservation across replicas and the
comparison.  Each service keeps its answers where it keeps its other data (the ledger, the outbox
database, the audit database): it gives ``run`` a ``find`` (the stored fingerprint and answer, or None)
and an ``execute`` that does the work and stores the answer; ``execute`` returns ``LOST_RACE`` when the
store already held an answer for the id (it must not overwrite it), which is then replayed or refused.

Taking turns on one id
----------------------
1. **In one process** a per-id lock: a concurrent call with the same id waits for the first, then finds
   its answer and replays it.  This is the whole story on SQLite, whose database belongs to one process.
2. **Across replicas** (PostgreSQL, ``dbstore.reservations``) the first caller *reserves* the id before
   any work: one row (request id, fingerprint, holder = ``RequestIds.holder``, lease expiry) in the
   same database as the answers.  It then executes, and the store deletes the reservation in the very
   transaction that stores the answer (for MintCertificate: the transaction that commits the
   certificate), so "answer stored" and "reservation over" are one commit.  While it executes the
   holder renews its lease every third of ``lease``.  (Crash point ``request.reserved``: this process
   holds the id, by the lock alone on SQLite, and is about to execute; nothing done yet.)
3. A caller on another replica that finds the reservation:
   - another fingerprint: ``REQUEST_ID_REUSED`` at once;
   - the same fingerprint: it waits, polling the store with a growing pause (``POLL_FIRST`` doubling to
     ``POLL_MAX``), until the answer is stored (it replays it), the reservation is released (the work
     failed: it runs the request itself) or the lease ran out (below).  If the caller's deadline
     (``provkit.context.current_deadline``) comes first, the call fails with ``Aborted`` reason
     ``REQUEST_IN_PROGRESS`` (metadata ``request_id``, ``RetryInfo``): retry later with the same id; it is
     never executed a second time meanwhile.
4. **A holder that died** (kill -9, power cut) stops renewing; once its lease has run out the next caller
   with the same request *takes the reservation over* and executes again.  The work must therefore be
   safe to resume from whatever the dead holder committed; each service's work is:
   - MintCertificate: the certificate and the answer are one transaction, so the dead holder either left
     nothing (its signed certificate never reached the ledger nor anyone) or left the answer, which the
     takeover finds and replays: one certificate in the ledger.
   - Enroll / EnrollBatch: codes are retained before their hashes reach DPS, and the work recognises an
     enrollment that already holds the very certificate (UNCHANGED, with the retained code) or a waiting
     outbox entry of it: one DPS write, one code that works.  (An item with ``replace`` set is written
     again, with a new code: the dead holder's never reached anyone.)
   - Activate: a recorded intent (``activation_svc.intents``); the takeover's call finishes the dead
     holder's intent once its hold ran out, or finds the enrollment holding the wanted state (UNCHANGED):
     one etag-guarded DPS write.
   - RotateActivationCode: a takeover rotates once more (the dead holder's code never reached anyone
     and stops working); TransferOwnership finds the owner already named (``changed`` false, and the
     transfer's audit row is missing if the holder died between DPS and the audit); Acknowledge-
     ActivationCodes finds the codes gone (count 0); Deactivate finds the device disabled.  Each ends in
     the state asked for.
   A failed execution (an error raised) releases the reservation: the next call with the id runs again,
   as before (error answers are not stored; EnrollBatch stores its per-item errors in its answer).
   A holder stalled longer than its lease (not dead) may finish after a takeover: the second answer
   stored is refused by the answer table's key (``LOST_RACE``) and the first is replayed, but the work ran
   twice; ``lease`` must be far longer than a stall (default 30 s, set per service by
   ``<SERVICE>_REQUESTS_LEASE_SECONDS``), and replicas' clocks must agree to well within it.

API
---
``fingerprint(request) -> str``               the SHA-256 of the request's canonical JSON.
``check_request_id(request_id, field="request_id")``   the id rules (1-128 printable ASCII); ``run``
    checks too, but call it with the rest of the validation, before anything is written or counted.
``Stored(fingerprint, answer)``               what a store gives back for an id.
``RequestIds(reservations=None, lease=LEASE)``   one per service; ``reservations``: the store's
    ``dbstore.reservations.Reservations`` (None, or a SQLite one: the per-process lock only).
``RequestIds.run(request_id, fingerprint, *, find, replay, execute, look_first=True)``   see above.
    ``look_first=False``: execute at once, with no reservation even on a shared store, and look for a
    stored answer only when the store refuses the id (``LOST_RACE``): the store's unique key on its
    answers decides, between replicas as within one process (the loser's result is thrown away and the
    winner's answer replayed).  One trip to the store for a new id instead of two (three with a
    reservation); a repeat, or a race between replicas, costs one execution whose result is thrown away,
    so only for work that leaves nothing behind until it is stored and answered in one transaction (a
    certificate signed but never recorded nor answered).
``RequestIdReused`` (InvalidArgument)         the one refusal of a reused id.
``RequestInProgress`` (Aborted)               another replica still runs it; retry after ``retry_after``.
``LOST_RACE`` / ``LostRace``                  what ``execute`` returns when the id had an answer already.
``RequestIds.holder``                         who holds its reservations: ``INSTANCE`` (host:pid) and a
    random part, so every service object (even two in one process, as in tests) is its own holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Generic, Literal, TypeVar

from dbstore.reservations import ClaimKind, Reservations
from provkit.context import current_deadline
from provkit.errors import Aborted, InvalidArgument, Reason, invalid_field
from provkit.faults import crash_point

log = logging.getLogger("provkit.idempotency")

A = TypeVar("A")  # an answer as stored
T = TypeVar("T")  # an answer as returned

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")

LEASE = timedelta(seconds=30)
POLL_FIRST, POLL_MAX = 0.02, 0.5  # seconds between looks at another replica's reservation
_DEADLINE_MARGIN = 0.2  # answer REQUEST_IN_PROGRESS this long before the caller's deadline
INSTANCE: Final = f"{socket.gethostname()}:{os.getpid()}"


class _LostRace(enum.Enum):
    LOST_RACE = "lost-race"


LOST_RACE: Final = _LostRace.LOST_RACE
LostRace = Literal[_LostRace.LOST_RACE]  # the type of LOST_RACE, for ``execute``'s annotation


class RequestIdReused(InvalidArgument):
    def __init__(self, request_id: str) -> None:
        super().__init__(
            Reason.REQUEST_ID_REUSED,
            "this request_id was already used for a different request",
            metadata={"request_id": request_id},
        )


class RequestInProgress(Aborted):
    def __init__(self, request_id: str, retry_after: float) -> None:
        super().__init__(
            Reason.REQUEST_IN_PROGRESS,
            "another replica is still executing this request_id; retry later with the same id",
            metadata={"request_id": request_id},
            retry_after=retry_after,
        )


@dataclass(frozen=True)
class Stored(Generic[A]):
    fingerprint: str
    answer: A


def fingerprint(request: Any) -> str:
    """The SHA-256 (hex) of ``request``'s canonical JSON (sorted keys): give it what the caller asked for,
    normalised, and nothing the service adds."""
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def check_request_id(request_id: str, field: str = "request_id") -> None:
    if request_id and not _REQUEST_ID.match(request_id):
        raise invalid_field(
            field, Reason.REQUEST_ID_INVALID, "the request id must be 1-128 printable ASCII characters"
        )


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


class RequestIds:
    """One per service instance: the per-process locks, and the reservations of a shared store."""

    def __init__(self, reservations: Reservations | None = None, *, lease: timedelta = LEASE) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._reservations = reservations if reservations is not None and reservations.shared else None
        self._lease = lease.total_seconds()
        self.holder = f"{INSTANCE}:{secrets.token_hex(4)}"
        if self._lease <= 0:
            raise ValueError("the request lease must be positive")

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, request_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(request_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[request_id]

    async def run(
        self,
        request_id: str,
        fingerprint: str,
        *,
        find: Callable[[], Awaitable[Stored[A] | None]],
        replay: Callable[[A], Awaitable[T]],
        execute: Callable[[], Awaitable[T | LostRace]],
        look_first: bool = True,
    ) -> T:
        """``execute()`` once per request id (without an id: every time); a repeat gets ``replay(answer)``
        of the stored answer, or ``RequestIdReused`` when its fingerprint differs.  ``look_first``: see
        the module's description."""
        if not request_id:
            result = await execute()
            if result is LOST_RACE:
                raise RuntimeError("a store reported a request id clash for a request without one")
            return result
        check_request_id(request_id)
        async with self._one_at_a_time(request_id):
            reservations = self._reservations if look_first else None
            if reservations is not None:  # the claim looks for an answer too: one round trip for both
                stored = await self._reserve(reservations, request_id, fingerprint, find)
            elif look_first:
                stored = await find()
            else:
                stored = None  # the store's unique key answers LOST_RACE for an id it holds
            if stored is None:
                crash_point("request.reserved")  # this process holds the id; nothing done yet
                result = await self._execute(reservations, request_id, execute)
                if result is not LOST_RACE:
                    return result
                stored = await find()
                if stored is None:
                    raise RuntimeError("a store refused a request id that it does not hold")
            if stored.fingerprint != fingerprint:
                raise RequestIdReused(request_id)
            return await replay(stored.answer)

    async def _reserve(
        self,
        reservations: Reservations,
        request_id: str,
        fingerprint: str,
        find: Callable[[], Awaitable[Stored[A] | None]],
    ) -> Stored[A] | None:
        """Hold ``request_id`` for this process (None), or the answer another replica stored meanwhile;
        waits while another replica holds it."""
        deadline = current_deadline()
        pause = POLL_FIRST
        while True:
            now = time.time()
            claimed = await reservations.claim(
                request_id, fingerprint, self.holder, _us(now), _us(now + self._lease)
            )
            kind = claimed.kind
            if kind is ClaimKind.RESERVED:
                return None
            if kind is ClaimKind.TAKEN_OVER:
                log.warning(
                    "request id taken over from a holder whose lease ran out",
                    extra={"request_id": request_id, "previous_holder": claimed.holder},
                )
                return None
            if kind is ClaimKind.REUSED:
                raise RequestIdReused(request_id)
            if kind is ClaimKind.ANSWERED:
                stored = await find()
                if stored is not None:
                    return stored  # (else look again after a pause: an answer is never deleted)
            if deadline is not None and time.monotonic() + pause > deadline - _DEADLINE_MARGIN:
                raise RequestInProgress(request_id, retry_after=POLL_MAX * 2)
            await asyncio.sleep(pause)
            pause = min(pause * 2, POLL_MAX)

    async def _execute(
        self,
        reservations: Reservations | None,
        request_id: str,
        execute: Callable[[], Awaitable[T | LostRace]],
    ) -> T | LostRace:
        """``execute()``, renewing the reservation meanwhile; a failure (or a lost race) releases it."""
        if reservations is None:
            return await execute()
        renewing = asyncio.create_task(self._renew(reservations, request_id), name="request-lease")
        settled = False
        try:
            result = await execute()
            settled = result is not LOST_RACE  # the store deleted the reservation with the answer
            return result
        finally:
            renewing.cancel()
            if not settled:
                with contextlib.suppress(Exception):  # else it runs out with its lease
                    await asyncio.shield(reservations.release(request_id, self.holder))

    async def _renew(self, reservations: Reservations, request_id: str) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                held = await reservations.renew(request_id, self.holder, _us(time.time() + self._lease))
            except Exception:
                log.warning("could not renew a request lease", extra={"request_id": request_id})
                continue
            if not held:
                log.warning(
                    "request lease lost while executing (stalled longer than the lease?)",
                    extra={"request_id": request_id},
                )
                return
