"""Failed activation attempts: per (caller, device) with a growing back-off, a per-device ceiling over all
callers, exact counting of admitted checks (clock injected; no gRPC here)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import pytest

from activation_svc.ratelimit import AttemptLimiter, AttemptsExhausted


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def fail(limiter: AttemptLimiter, caller: str, device: str = "dev") -> None:
    with limiter.begin(caller, device) as attempt:
        attempt.failed()


def test_free_failures_then_a_doubling_back_off_for_that_caller_only() -> None:
    clock = Clock()
    limiter = AttemptLimiter(clock=clock, free_failures=3, base_delay=timedelta(seconds=2))
    for _ in range(3):
        fail(limiter, "mallory")
    with pytest.raises(AttemptsExhausted) as caught:
        limiter.begin("mallory", "dev")
    assert caught.value.retry_after == 2
    with limiter.begin("owner", "dev") as attempt:  # another party is not slowed at all
        attempt.succeeded()
    waits = []
    for _ in range(3):
        clock.advance(limiter.delay_after(3 + len(waits)).total_seconds())
        fail(limiter, "mallory")
        with pytest.raises(AttemptsExhausted) as caught:
            limiter.begin("mallory", "dev")
        waits.append(caught.value.retry_after)
    assert waits == [4, 8, 16]


def test_a_success_clears_the_pair_and_an_unchecked_attempt_counts_nothing() -> None:
    clock = Clock()
    limiter = AttemptLimiter(clock=clock, free_failures=2)
    fail(limiter, "oem")
    with limiter.begin("oem", "dev") as attempt:
        attempt.succeeded()
    for _ in range(5):
        with limiter.begin("oem", "dev"):
            pass  # e.g. DPS unreachable: no check happened
    fail(limiter, "oem")
    fail(limiter, "oem")
    with pytest.raises(AttemptsExhausted):
        limiter.begin("oem", "dev")


def test_the_device_ceiling_bounds_many_callers_together() -> None:
    clock = Clock()
    limiter = AttemptLimiter(clock=clock, free_failures=2, device_ceiling=6, window=timedelta(minutes=10))
    for caller in ("a", "b", "c"):
        fail(limiter, caller)
        fail(limiter, caller)
    with pytest.raises(AttemptsExhausted) as caught:
        limiter.begin("d", "dev")
    assert 599 <= caught.value.retry_after <= 600
    with limiter.begin("d", "other-device") as attempt:
        attempt.failed()
    clock.advance(600)
    with limiter.begin("d", "dev") as attempt:
        attempt.succeeded()


def test_admitted_checks_are_counted_before_they_finish() -> None:
    limiter = AttemptLimiter(clock=Clock(), free_failures=5)
    admitted = []
    for _ in range(60):
        with contextlib.suppress(AttemptsExhausted):
            admitted.append(limiter.begin("storm", "dev"))
    assert len(admitted) == 5
    for attempt in admitted:
        attempt.failed()
    with pytest.raises(AttemptsExhausted):
        limiter.begin("storm", "dev")
