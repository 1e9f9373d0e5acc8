"""Failed activation attempts per id are limited within a window (clock injected)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from activation_svc.ratelimit import FailureLimiter


def test_limit_then_window_expiry_then_success_resets():
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    limiter = FailureLimiter(3, timedelta(minutes=10), lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("dev") is None
        limiter.failed("dev")
    wait = limiter.retry_after("dev")
    assert wait is not None and 599 <= wait <= 600
    assert limiter.retry_after("other") is None
    now[0] += timedelta(minutes=10)
    assert limiter.retry_after("dev") is None
    limiter.failed("dev")
    limiter.failed("dev")
    limiter.succeeded("dev")
    limiter.failed("dev")
    assert limiter.retry_after("dev") is None
