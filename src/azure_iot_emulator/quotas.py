"""Azure's rate quotas for one unit, enforced only with ``--azure-quotas`` (pure; the clock is injected).

As Azure documents them (DPS limits, IoT Hub quotas and throttling):

- DPS service operations (enrollment and registration-state API calls; a bulk call counts once per
  enrollment in it): 1,000 per minute per unit.
- DPS device registrations (register requests, MQTT or HTTPS): 1,000 per minute per unit.
- DPS device polling (operation-status requests): 5 per 10 seconds per device.
- IoT Hub device-to-cloud sends per hub: F1 and S1 100/s (S1: the higher of 100/s and 12/s/unit), S2 120/s,
  S3 6,000/s.  Azure shapes this traffic (acknowledges late) rather than refusing it over MQTT.

Each limit is a token bucket holding the whole quota and refilled at its average rate, so a burst up to
the quota passes and a steady flow settles at the documented rate.  A refusal says when to come back
(whole seconds, at least 1: the SDKs parse ``retry-after`` as an integer) and uses no tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

HUB_D2C_PER_SECOND = {"F1": 100.0, "S1": 100.0, "S2": 120.0, "S3": 6000.0}


@dataclass(frozen=True)
class Limit:
    count: int
    per_seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.per_seconds


DPS_SERVICE_OPERATIONS = Limit(1000, 60.0)
DPS_REGISTRATIONS = Limit(1000, 60.0)
DPS_POLLS_PER_DEVICE = Limit(5, 10.0)


class TokenBuckets:
    """One bucket per key (a single key "" for a service-wide limit).  Buckets full again are forgotten,
    so per-device buckets do not accumulate."""

    def __init__(self, limit: Limit, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._now = monotonic
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.limit.count), now))
        return min(float(self.limit.count), tokens + (now - at) * self.limit.rate)

    def take(self, key: str = "", n: int = 1) -> int | None:
        """Use ``n`` tokens: None when allowed, else the seconds to wait before asking again."""
        now = self._now()
        tokens = self._tokens(key, now)
        if tokens < n:
            return max(1, math.ceil((n - tokens) / self.limit.rate))
        self._buckets[key] = (tokens - n, now)
        if len(self._buckets) > 10_000:
            self._forget_full(now)
        return None

    def delay(self, key: str = "", n: int = 1) -> float:
        """Traffic shaping: use ``n`` tokens now (the balance may go negative) and return how long the
        sender should be kept waiting (0 while within the rate)."""
        now = self._now()
        tokens = self._tokens(key, now) - n
        self._buckets[key] = (tokens, now)
        return 0.0 if tokens >= 0 else -tokens / self.limit.rate

    def _forget_full(self, now: float) -> None:
        full = [k for k in self._buckets if self._tokens(k, now) >= self.limit.count]
        for key in full:
            del self._buckets[key]


class DpsQuotas:
    """The three DPS quotas of one unit."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.operations = TokenBuckets(DPS_SERVICE_OPERATIONS, monotonic)
        self.registrations = TokenBuckets(DPS_REGISTRATIONS, monotonic)
        self.polls = TokenBuckets(DPS_POLLS_PER_DEVICE, monotonic)


def hub_d2c(tier: str, monotonic: Callable[[], float] = time.monotonic) -> TokenBuckets:
    """Per-hub device-to-cloud shaping for one unit of ``tier`` (one second of sends may burst)."""
    per_second = HUB_D2C_PER_SECOND[tier.upper()]
    return TokenBuckets(Limit(math.ceil(per_second), 1.0), monotonic)
