"""Time, once: the clock type that code takes to be testable, and the microsecond integers stores keep.

``Clock``                       a function answering the current time (timezone-aware); inject one where
                                expiry or back-off matters, so tests can move time.
``now_utc() -> datetime``       the real clock.
``to_us(moment) -> int``        microseconds since the epoch, exactly (integer arithmetic, no float
                                rounding: a stored time reads back as the same instant).
``from_us(value) -> datetime``  the inverse, in UTC.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_utc() -> datetime:
    return datetime.now(UTC)


def to_us(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(value: int) -> datetime:
    return datetime.fromtimestamp(value // 1_000_000, UTC).replace(microsecond=value % 1_000_000)
