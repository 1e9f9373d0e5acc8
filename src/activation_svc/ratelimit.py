"""Per-device-id limit on failed activation attempts (guessing codes must be slow).

``FailureLimiter(max_failures=5, window=timedelta(minutes=15), clock)``: after ``max_failures`` failures for
one id within ``window`` further attempts for that id are refused until the oldest failure leaves the
window.  ``retry_after(id) -> float | None`` (seconds, None when allowed), ``failed(id)``, ``succeeded(id)``.
Kept in memory: a restart forgives, which is fine for an 80-bit code.  The same limit applies to unknown
ids, so the limit itself reveals nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta

MAX_TRACKED_IDS = 100_000


class FailureLimiter:
    def __init__(self, max_failures: int, window: timedelta, clock: Callable[[], datetime]) -> None:
        self._max = max_failures
        self._window = window
        self._clock = clock
        self._failures: dict[str, deque[datetime]] = {}

    def _prune(self, device_id: str, now: datetime) -> deque[datetime] | None:
        times = self._failures.get(device_id)
        if times is None:
            return None
        while times and now - times[0] >= self._window:
            times.popleft()
        if not times:
            del self._failures[device_id]
            return None
        return times

    def retry_after(self, device_id: str) -> float | None:
        now = self._clock()
        times = self._prune(device_id, now)
        if times is None or len(times) < self._max:
            return None
        return max(0.001, (times[0] + self._window - now).total_seconds())

    def failed(self, device_id: str) -> None:
        now = self._clock()
        if len(self._failures) >= MAX_TRACKED_IDS and device_id not in self._failures:
            for key in list(self._failures)[: MAX_TRACKED_IDS // 10]:
                self._prune(key, now)
        self._failures.setdefault(device_id, deque()).append(now)

    def succeeded(self, device_id: str) -> None:
        self._failures.pop(device_id, None)
