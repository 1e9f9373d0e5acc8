"""Limits on failed activation attempts: guessing codes must be slow, and nobody's guessing may lock out
the rightful owner.

One limit, on code checks, **per (caller, device)**: ``free_failures`` failures pass without delay; after
that one attempt at a time, each after a back-off that doubles per further failure (``base_delay``, 2x, 4x
... up to ``max_delay``).  A success clears the pair; a pair without a failure for ``window`` (or
``max_delay``, the longer) is forgotten.  One party's storm of wrong codes therefore slows that party
only.  An attempt is counted when it is let through, before the code is checked, so N allowed means N
checked, also for concurrent calls: when the attempts already in flight could use up what is left, a new
one waits for them to finish and is then admitted (they succeeded) or refused (they failed) - concurrent
right codes are never refused for being concurrent.

There is deliberately no limit per device over all callers: whatever its height, anyone able to fail often
enough (many certificates, many portal users, many addresses) could reach it and refuse the owner's right
code.  The bound against many identities guessing at once is the code's 80 bits (the arithmetic is in the
README); who counts as one caller is the service's decision (``activation_svc.service``).

Unknown device ids are limited the same way, so the limit reveals nothing.  Kept in process memory when
one process serves the API (SQLite; a restart forgives, which is fine for an 80-bit code); several
replicas on PostgreSQL keep the same limits in the database instead (``activation_svc.shared_limits``).

API: ``AttemptLimiter(free_failures=5, base_delay=..., max_delay=..., window=..., clock=...)``;
``async .begin(caller_key, device_id) -> Attempt`` or raises ``AttemptsExhausted(retry_after)``;
``Attempt.failed()`` / ``.succeeded()``; leaving ``with attempt:`` without either releases the slot
uncounted (the check did not happen, e.g. DPS was unreachable).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType

from provkit.clock import Clock

MAX_TRACKED = 100_000


class AttemptsExhausted(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"try again in {retry_after:.0f} s")
        self.retry_after = retry_after


@dataclass
class _Pair:
    failures: int = 0
    in_flight: int = 0
    last_failure: datetime | None = None
    next_allowed: datetime | None = None
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Attempt:
    """One admitted code check; report its outcome once."""

    def __init__(self, limiter: AttemptLimiter, pair_key: tuple[str, str]) -> None:
        self._limiter = limiter
        self._key = pair_key
        self._open = True

    def failed(self) -> None:
        if self._open:
            self._open = False
            self._limiter._finish(self._key, failed=True)

    def succeeded(self) -> None:
        if self._open:
            self._open = False
            self._limiter._finish(self._key, failed=False, clear=True)

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._open:
            self._open = False
            self._limiter._finish(self._key, failed=False)


class AttemptLimiter:
    def __init__(
        self,
        *,
        clock: Clock,
        free_failures: int = 5,
        base_delay: timedelta = timedelta(seconds=2),
        max_delay: timedelta = timedelta(minutes=15),
        window: timedelta = timedelta(minutes=15),
    ) -> None:
        self._clock = clock
        self._free = free_failures
        self._base = base_delay
        self._max = max_delay
        self._window = window
        self._pairs: dict[tuple[str, str], _Pair] = {}

    def delay_after(self, failures: int) -> timedelta:
        """The back-off before the next attempt of a pair that has ``failures`` failures."""
        return backoff(failures, self._free, self._base, self._max)

    # --------------------------------------------------------------------------------------- admit
    async def begin(self, caller_key: str, device_id: str) -> Attempt:
        """Admit one code check, or raise ``AttemptsExhausted`` (nothing counted then).  Waits while the
        pair's attempts in flight decide whether there is room for this one."""
        key = (caller_key, device_id)
        while True:
            now = self._clock()
            self._bound(now)
            pair = self._pair(key, now)
            if pair.failures + pair.in_flight < self._free:
                break
            if pair.in_flight:  # past the free failures one attempt at a time; else wait for the others
                await self._wait(key, pair)
                continue
            if pair.next_allowed is not None and now < pair.next_allowed:
                raise AttemptsExhausted(seconds_of(pair.next_allowed - now))
            break
        pair.in_flight += 1
        self._pairs[key] = pair
        return Attempt(self, key)

    async def _wait(self, key: tuple[str, str], pair: _Pair) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pair.waiters.append(waiter)
        self._pairs[key] = pair
        try:
            await waiter
        finally:
            if waiter in pair.waiters:
                pair.waiters.remove(waiter)

    def _finish(self, key: tuple[str, str], *, failed: bool, clear: bool = False) -> None:
        now = self._clock()
        pair = self._pairs.get(key)
        if pair is None:
            return
        pair.in_flight = max(0, pair.in_flight - 1)
        if clear:
            pair.failures, pair.last_failure, pair.next_allowed = 0, None, None
        elif failed:
            pair.failures += 1
            pair.last_failure = now
            pair.next_allowed = now + self.delay_after(pair.failures)
        waiters, pair.waiters = pair.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if not pair.failures and not pair.in_flight and not waiters:
            del self._pairs[key]

    # ------------------------------------------------------------------------------------ upkeep
    def _pair(self, key: tuple[str, str], now: datetime) -> _Pair:
        pair = self._pairs.get(key)
        if pair is None:
            return _Pair()
        idle = pair.last_failure is not None and now - pair.last_failure >= max(self._window, self._max)
        if idle and not pair.in_flight and not pair.waiters:
            del self._pairs[key]
            return _Pair()
        return pair

    def _bound(self, now: datetime) -> None:
        """Forget idle entries when too many are tracked (memory stays bounded under a flood of ids)."""
        if len(self._pairs) < MAX_TRACKED:
            return
        for key in list(self._pairs):
            self._pair(key, now)


def backoff(failures: int, free: int, base: timedelta, ceiling: timedelta) -> timedelta:
    """The back-off before a pair's next attempt after ``failures`` failures: none for the first ``free``,
    then ``base`` doubling per further failure, at most ``ceiling``."""
    if failures < free:
        return timedelta(0)
    exponent = min(failures - free, 30)
    return min(ceiling, base * math.pow(2, exponent))


def seconds_of(delta: timedelta) -> float:
    return max(1.0, math.ceil(delta.total_seconds()))
