"""Request-id idempotency (AIP-155) for every mutating RPC, written once.

A caller may send an optional ``request_id``.  A retry with the same id and the same request returns the
first answer and does nothing twice; the same id with a different request is refused with
``InvalidArgument`` reason ``REQUEST_ID_REUSED`` (metadata ``request_id``): a client error, the caller
must pick a fresh id (AIP-155).  A malformed id is ``InvalidArgument`` ``REQUEST_ID_INVALID`` (field
``request_id``).

The helper owns the fingerprint of a request, the per-id lock (concurrent calls with one id wait for the
first and then replay its answer) and the comparison.  Each service keeps its answers where it keeps its
other data (the ledger, the outbox file, the audit file): it gives ``run`` a ``find`` (the stored
fingerprint and answer, or None) and an ``execute`` that does the work and stores the answer.  The lock
is per process; across processes the store's unique key decides, and ``execute`` may return
``LOST_RACE`` (another process stored the id first) to have the stored answer replayed or refused.

API
---
``fingerprint(request) -> str``               the SHA-256 of the request's canonical JSON.
``check_request_id(request_id, field="request_id")``   the id rules (1-128 printable ASCII); ``run``
    checks too, but call it with the rest of the validation, before anything is written or counted.
``Stored(fingerprint, answer)``               what a store gives back for an id.
``RequestIds.run(request_id, fingerprint, *, find, replay, execute)``   see above.
``RequestIdReused`` (InvalidArgument)         the one refusal of a reused id.
``LOST_RACE`` / ``LostRace``                  what ``execute`` returns when another process won.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar

from provkit.errors import InvalidArgument, invalid_field

A = TypeVar("A")  # an answer as stored
T = TypeVar("T")  # an answer as returned

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


class _LostRace(enum.Enum):
    LOST_RACE = "lost-race"


LOST_RACE: Final = _LostRace.LOST_RACE
LostRace = Literal[_LostRace.LOST_RACE]  # the type of LOST_RACE, for ``execute``'s annotation


class RequestIdReused(InvalidArgument):
    def __init__(self, request_id: str) -> None:
        super().__init__(
            "REQUEST_ID_REUSED",
            "this request_id was already used for a different request",
            metadata={"request_id": request_id},
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
            field, "REQUEST_ID_INVALID", "the request id must be 1-128 printable ASCII characters"
        )


class RequestIds:
    """One per service instance (the locks are per process)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

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
    ) -> T:
        """``execute()`` once per request id (without an id: every time); a repeat gets ``replay(answer)``
        of the stored answer, or ``RequestIdReused`` when its fingerprint differs."""
        if not request_id:
            result = await execute()
            if result is LOST_RACE:
                raise RuntimeError("a store reported a request id clash for a request without one")
            return result
        check_request_id(request_id)
        async with self._one_at_a_time(request_id):
            stored = await find()
            if stored is None:
                result = await execute()
                if result is not LOST_RACE:
                    return result
                stored = await find()
                if stored is None:
                    raise RuntimeError("a store refused a request id that it does not hold")
            if stored.fingerprint != fingerprint:
                raise RequestIdReused(request_id)
            return await replay(stored.answer)
