"""A clock the test moves: the one injectable clock of the tests.

    clock = ManualClock()                       # 2026-01-01T00:00:00Z, timezone-aware
    service = Something(clock=clock)            # anything that takes ``Callable[[], datetime]``
    clock.advance(seconds=2)                    # or ``clock.now += timedelta(...)``, ``clock.now = ...``

    ticks = ManualClock(1000.0)                 # a monotonic clock in seconds (``Callable[[], float]``)
    ticks.advance(0.5)

``reads`` counts the calls: a test can wait until the code under test has looked at the time again (one more
round of a polling loop) instead of sleeping.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

T = TypeVar("T", datetime, float)

START = datetime(2026, 1, 1, tzinfo=UTC)


class ManualClock(Generic[T]):
    def __init__(self, now: T = START) -> None:
        self.now: T = now
        self.reads = 0

    def __call__(self) -> T:
        self.reads += 1
        return self.now

    def advance(self, seconds: float) -> T:
        """Move the clock ``seconds`` forward; the new time."""
        if isinstance(self.now, datetime):
            self.now = self.now + timedelta(seconds=seconds)
        else:
            self.now = self.now + seconds
        return self.now
