"""Failed activation attempts: per (caller, device) with a growing back-off and nothing over all callers (no
number of failing callers refuses another), exact counting of admitted checks; concurrent attempts wait for
room instead of being refused (clock injected; no gRPC here)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from support.clock import ManualClock

from activation_svc.ratelimit import AttemptLimiter, AttemptsExhausted
from activation_svc.settings import load_settings
from provkit.settings import SettingsError


async def fail(limiter: AttemptLimiter, caller: str, device: str = "dev") -> None:
    with await limiter.begin(caller, device) as attempt:
        attempt.failed()


async def test_free_failures_then_a_doubling_back_off_for_that_caller_only() -> None:
    clock = ManualClock()
    limiter = AttemptLimiter(clock=clock, free_failures=3, base_delay=timedelta(seconds=2))
    for _ in range(3):
        await fail(limiter, "mallory")
    with pytest.raises(AttemptsExhausted) as caught:
        await limiter.begin("mallory", "dev")
    assert caught.value.retry_after == 2
    with await limiter.begin("owner", "dev") as attempt:  # another party is not slowed at all
        attempt.succeeded()
    waits = []
    for _ in range(3):
        clock.advance(limiter.delay_after(3 + len(waits)).total_seconds())
        await fail(limiter, "mallory")
        with pytest.raises(AttemptsExhausted) as caught:
            await limiter.begin("mallory", "dev")
        waits.append(caught.value.retry_after)
    assert waits == [4, 8, 16]


async def test_a_success_clears_the_pair_and_an_unchecked_attempt_counts_nothing() -> None:
    clock = ManualClock()
    limiter = AttemptLimiter(clock=clock, free_failures=2)
    await fail(limiter, "oem")
    with await limiter.begin("oem", "dev") as attempt:
        attempt.succeeded()
    for _ in range(5):
        with await limiter.begin("oem", "dev"):
            pass  # e.g. DPS unreachable: no check happened
    await fail(limiter, "oem")
    await fail(limiter, "oem")
    with pytest.raises(AttemptsExhausted):
        await limiter.begin("oem", "dev")


async def test_no_number_of_failing_callers_refuses_another_callers_check() -> None:
    clock = ManualClock()
    limiter = AttemptLimiter(clock=clock, free_failures=2, window=timedelta(minutes=10))
    for caller in range(300):  # 600 failed checks on one device, two from each of 300 callers
        await fail(limiter, f"guesser-{caller}")
        await fail(limiter, f"guesser-{caller}")
    with pytest.raises(AttemptsExhausted):
        await limiter.begin("guesser-7", "dev")  # each guesser is slowed...
    with await limiter.begin("owner", "dev") as attempt:  # ...and the owner's first check goes ahead
        attempt.succeeded()


async def test_sixty_concurrent_wrong_codes_get_exactly_the_free_checks_the_rest_wait_then_refused() -> None:
    limiter = AttemptLimiter(clock=ManualClock(), free_failures=5)
    tasks = [asyncio.ensure_future(limiter.begin("storm", "dev")) for _ in range(60)]
    await asyncio.sleep(0)
    admitted = [t.result() for t in tasks if t.done()]
    assert len(admitted) == 5  # the others wait for these to finish
    for attempt in admitted:
        attempt.failed()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, AttemptsExhausted) for r in results) == 55


async def test_concurrent_right_codes_wait_for_room_and_are_all_admitted() -> None:
    limiter = AttemptLimiter(clock=ManualClock(), free_failures=2)
    in_flight, most = 0, 0

    async def check() -> None:
        nonlocal in_flight, most
        with await limiter.begin("oem", "dev") as attempt:
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0)  # the check takes a while
            in_flight -= 1
            attempt.succeeded()

    await asyncio.gather(*(check() for _ in range(6)))  # none refused
    assert most == 2


def test_the_removed_per_device_ceiling_is_refused_at_start_up_naming_why() -> None:
    with pytest.raises(SettingsError, match=r"ACTIVATION_LIMITS_DEVICE_CEILING.*lock the owner out"):
        load_settings(env={"ACTIVATION_LIMITS_DEVICE_CEILING": "100"})
