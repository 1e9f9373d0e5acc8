"""Retry pacing for a device that may be one of thousands booting in the same second (kept pure).

- :class:`Backoff`: capped exponential back-off with *full jitter* (a delay drawn uniformly from
  ``[0, min(max_s, initial_s * factor**attempt)]``), the scheme that spreads a herd best for the least
  total waiting.  A ``retry_after`` the cloud asked for (DPS ``202``/``429``) is a floor: the delay is
  never shorter.  ``jitter=0`` gives the plain capped exponential sequence (tests, deterministic tools).
- :func:`first_attempt_delay`: a device's first attempt after boot is drawn uniformly over a small window,
  so a plant whose power came back does not knock on DPS all in the same millisecond.

Every delay handed out is recorded in ``schedule`` (what was asked for, what was chosen), so tests and
reports read the schedule rather than time the device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SCHEDULE_KEPT = 200


@dataclass(frozen=True)
class Wait:
    delay_s: float
    retry_after_s: float | None  # the floor the cloud asked for, if any
    attempt: int  # 0 for the first retry after a refusal


def first_attempt_delay(window_s: float, rng: random.Random | None = None) -> float:
    """A uniformly spread start within ``[0, window_s]`` (0 when the window is 0)."""
    if window_s <= 0:
        return 0.0
    return (rng or random).uniform(0.0, window_s)


@dataclass
class Backoff:
    initial_s: float
    max_s: float
    factor: float = 2.0
    jitter: float = 1.0  # 1: full jitter over [0, cap]; 0: none (the cap itself)
    attempts: int = 0
    schedule: list[Wait] = field(default_factory=list, repr=False)
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self, retry_after_s: float | None = None) -> float:
        cap = min(self.max_s, self.initial_s * self.factor**self.attempts)
        delay = cap - self._rng.uniform(0.0, cap * min(1.0, max(0.0, self.jitter)))
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        self.schedule.append(Wait(delay, retry_after_s, self.attempts))
        del self.schedule[:-SCHEDULE_KEPT]  # a device waiting days for activation keeps the recent ones
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0
