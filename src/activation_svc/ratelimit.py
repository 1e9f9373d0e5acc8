"""Limits on failed activation attempts: guessing codes must be slow, and nobody's guessing may lock out
the rightful owner.  The rule lives here once; it is kept in process memory (:class:`MemoryLimits`, here)
or in database rows every replica sees (``activation_svc.shared_limits.DatabaseLimits``).

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
replicas on PostgreSQL keep the same limits in the database instead.

The rule: :func:`decide` (a pair's state -> :class:`Admit`, :class:`Wait` or :class:`Refuse`) and
:func:`settle` (a pair's state and an :class:`Outcome` -> its next state), with the numbers in
:class:`Rules`.  The port the service and the portal use: :class:`FailureLimits` ``.begin(caller_key,
device_id) -> Slot`` or raises :class:`AttemptsExhausted` (nothing counted then); ``Slot.failed()`` /
``.succeeded()`` once, and ``.release()`` always (e.g. in ``finally``), which gives the slot back
uncounted when neither was reported (the check did not happen, e.g. DPS was unreachable).
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Protocol

from provkit.clock import Clock

MAX_TRACKED = 100_000


class AttemptsExhausted(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"try again in {retry_after:.0f} s")
        self.retry_after = retry_after


# ------------------------------------------------------------------------------------------ the rule
@dataclass(frozen=True)
class Rules:
    """The numbers of the limit."""

    free_failures: int = 5
    window: timedelta = timedelta(minutes=15)
    base_delay: timedelta = timedelta(seconds=2)
    max_delay: timedelta = timedelta(minutes=15)

    def delay_after(self, failures: int) -> timedelta:
        """The back-off before the next attempt of a pair that has ``failures`` failures."""
        return backoff(failures, self.free_failures, self.base_delay, self.max_delay)

    def idle(self, last_failure: datetime | None, now: datetime) -> bool:
        """Whether a pair whose last failure was at ``last_failure`` is forgotten by ``now``."""
        return last_failure is not None and now - last_failure >= max(self.window, self.max_delay)


@dataclass(frozen=True)
class PairState:
    """What is known of one (caller, device): its failures since the last success, its checks in flight."""

    failures: int = 0
    in_flight: int = 0
    last_failure: datetime | None = None
    next_allowed: datetime | None = None


@dataclass(frozen=True)
class Admit:
    """Let the check through (count it in flight)."""


@dataclass(frozen=True)
class Wait:
    """The pair's checks in flight decide whether there is room: look again when one has finished."""


@dataclass(frozen=True)
class Refuse:
    retry_after: float


Decision = Admit | Wait | Refuse


class Outcome(enum.Enum):
    FAILED = "failed"
    SUCCEEDED = "succeeded"
    RELEASED = "released"  # the check did not happen: nothing counted


def decide(rules: Rules, pair: PairState, now: datetime) -> Decision:
    """Whether a new check of ``pair`` (already forgotten if idle) may go ahead at ``now``."""
    if pair.failures + pair.in_flight < rules.free_failures:
        return Admit()
    if pair.in_flight:  # past the free failures one attempt at a time; else wait for the others
        return Wait()
    if pair.next_allowed is not None and now < pair.next_allowed:
        return Refuse(seconds_of(pair.next_allowed - now))
    return Admit()


def settle(rules: Rules, pair: PairState, outcome: Outcome, now: datetime) -> PairState:
    """``pair`` after one of its checks in flight ended with ``outcome`` at ``now``."""
    in_flight = max(0, pair.in_flight - 1)
    if outcome is Outcome.SUCCEEDED:
        return PairState(in_flight=in_flight)
    if outcome is Outcome.FAILED:
        failures = pair.failures + 1
        return PairState(failures, in_flight, now, now + rules.delay_after(failures))
    return replace(pair, in_flight=in_flight)


def backoff(failures: int, free: int, base: timedelta, ceiling: timedelta) -> timedelta:
    """The back-off before a pair's next attempt after ``failures`` failures: none for the first ``free``,
    then ``base`` doubling per further failure, at most ``ceiling``."""
    if failures < free:
        return timedelta(0)
    exponent = min(failures - free, 30)
    return min(ceiling, base * math.pow(2, exponent))


def seconds_of(delta: timedelta) -> float:
    return max(1.0, math.ceil(delta.total_seconds()))


# ------------------------------------------------------------------------------------------ the port
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


class SettleOnce:
    """A :class:`Slot` that hands its first outcome to ``settle`` and ignores the rest."""

    def __init__(self, settle: Callable[[Outcome], Awaitable[None]]) -> None:
        self._settle: Callable[[Outcome], Awaitable[None]] | None = settle

    async def _report(self, outcome: Outcome) -> None:
        settle, self._settle = self._settle, None
        if settle is not None:
            await settle(outcome)

    async def failed(self) -> None:
        await self._report(Outcome.FAILED)

    async def succeeded(self) -> None:
        await self._report(Outcome.SUCCEEDED)

    async def release(self) -> None:
        await self._report(Outcome.RELEASED)


# ---------------------------------------------------------------------------------------- in memory
@dataclass
class _Entry:
    state: PairState = PairState()
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class MemoryLimits:
    """The limits in this process's memory (one process serves the API); a waiting check waits for a
    future the finishing one resolves."""

    def __init__(self, *, clock: Clock, rules: Rules = Rules()) -> None:
        self._clock = clock
        self.rules = rules
        self._pairs: dict[tuple[str, str], _Entry] = {}

    async def begin(self, caller_key: str, device_id: str) -> Slot:
        """Admit one code check, or raise ``AttemptsExhausted`` (nothing counted then).  Waits while the
        pair's attempts in flight decide whether there is room for this one."""
        key = (caller_key, device_id)
        while True:
            now = self._clock()
            self._bound(now)
            entry = self._entry(key, now)
            decision = decide(self.rules, entry.state, now)
            if isinstance(decision, Refuse):
                raise AttemptsExhausted(decision.retry_after)
            if isinstance(decision, Admit):
                break
            await self._wait(key, entry)
        entry.state = replace(entry.state, in_flight=entry.state.in_flight + 1)
        self._pairs[key] = entry

        async def finish(outcome: Outcome) -> None:
            self._finish(key, outcome)

        return SettleOnce(finish)

    async def _wait(self, key: tuple[str, str], entry: _Entry) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.waiters.append(waiter)
        self._pairs[key] = entry
        try:
            await waiter
        finally:
            if waiter in entry.waiters:
                entry.waiters.remove(waiter)

    def _finish(self, key: tuple[str, str], outcome: Outcome) -> None:
        entry = self._pairs.get(key)
        if entry is None:
            return
        entry.state = settle(self.rules, entry.state, outcome, self._clock())
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if not entry.state.failures and not entry.state.in_flight and not waiters:
            del self._pairs[key]

    def _entry(self, key: tuple[str, str], now: datetime) -> _Entry:
        entry = self._pairs.get(key)
        if entry is None:
            return _Entry()
        if self.rules.idle(entry.state.last_failure, now) and not entry.state.in_flight and not entry.waiters:
            del self._pairs[key]
            return _Entry()
        return entry

    def _bound(self, now: datetime) -> None:
        """Forget idle entries when too many are tracked (memory stays bounded under a flood of ids)."""
        if len(self._pairs) < MAX_TRACKED:
            return
        for key in list(self._pairs):
            self._entry(key, now)
