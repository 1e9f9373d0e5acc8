"""The wrong-code limit, one contract for both of its storages: in memory (one process) and in PostgreSQL
(two replicas' stores on one database).  Per (caller, device): free failures, then one check at a time after
a doubling back-off; admitted checks counted exactly under concurrency; a success clears the pair; no number
of failing callers refuses another; concurrent right codes wait for room instead of being refused; on
PostgreSQL a check whose replica died gives its slot back when its lease runs out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from support.clock import ManualClock
from support.waiting import until

from activation_svc.audit import AuditLog
from activation_svc.ratelimit import AttemptsExhausted, FailureLimits, MemoryLimits, Rules
from activation_svc.settings import load_settings
from activation_svc.shared_limits import CHECK_LEASE, DatabaseLimits
from dbstore import DatabaseUrl
from provkit.settings import SettingsError

Replicas = Callable[[Rules], list[FailureLimits]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=["memory", "postgresql"])
async def replicas(request, clock):
    """Two limits that must act as one, for given rules: the same in-memory limiter twice (one process), or
    two replicas' stores on one PostgreSQL database."""
    if request.param == "memory":
        yield lambda rules: [MemoryLimits(clock=clock, rules=rules)] * 2
        return
    url = DatabaseUrl.parse(request.getfixturevalue("postgres_url"))
    stores = [await AuditLog.open(url, migrate=True), await AuditLog.open(url)]
    yield lambda rules: [DatabaseLimits(store.db, clock=clock, rules=rules) for store in stores]
    for store in stores:
        await store.close()


async def check(limits: FailureLimits, caller: str, device: str = "dev", *, right: bool = False) -> str:
    """One code check through ``limits``: "refused", or "checked" (reported failed, or succeeded)."""
    try:
        slot = await limits.begin(caller, device)
    except AttemptsExhausted:
        return "refused"
    try:
        await asyncio.sleep(0)  # the check takes a moment: others arrive meanwhile
        await (slot.succeeded() if right else slot.failed())
        return "checked"
    finally:
        await slot.release()


async def retry_after(limits: FailureLimits, caller: str) -> float:
    with pytest.raises(AttemptsExhausted) as caught:
        await limits.begin(caller, "dev")
    return caught.value.retry_after


async def test_free_failures_then_a_doubling_back_off_for_that_caller_only(replicas: Replicas, clock) -> None:
    rules = Rules(3)
    first, second = replicas(rules)
    for limits in (first, second, first):
        assert await check(limits, "mallory") == "checked"
    assert await retry_after(second, "mallory") == 2
    assert await check(second, "owner", right=True) == "checked"  # another party is not slowed at all
    waits = []
    for failures in (3, 4, 5):
        clock.advance(rules.delay_after(failures).total_seconds())
        assert await check(first if failures % 2 else second, "mallory") == "checked"
        waits.append(await retry_after(first, "mallory"))
    assert waits == [4, 8, 16]


async def test_admitted_checks_are_counted_exactly_under_concurrency(replicas: Replicas, clock) -> None:
    limits = replicas(Rules(3))
    outcomes = await asyncio.gather(*(check(limits[i % 2], "oem:a") for i in range(12)))
    assert sorted(outcomes) == ["checked"] * 3 + ["refused"] * 9  # the rest waited for room, then refused
    clock.advance(2)  # the back-off after the 3 free failures: one more check, on either
    outcomes = await asyncio.gather(*(check(limits[i % 2], "oem:a") for i in range(4)))
    assert sorted(outcomes) == ["checked"] + ["refused"] * 3
    assert await check(limits[1], "oem:b") == "checked"  # another party is not slowed by oem:a's failures


async def test_a_success_clears_the_pair_and_an_unchecked_attempt_counts_nothing(replicas: Replicas) -> None:
    first, second = replicas(Rules(2))
    assert await check(first, "oem") == "checked"
    assert await check(second, "oem", right=True) == "checked"
    for limits in (first, second) * 3:
        slot = await limits.begin("oem", "dev")
        await slot.release()  # e.g. DPS unreachable: no check happened
    assert await check(first, "oem") == "checked"
    assert await check(second, "oem") == "checked"
    assert await check(first, "oem") == "refused"


async def test_no_number_of_failing_callers_refuses_another_callers_check(replicas: Replicas) -> None:
    limits = replicas(Rules(2))
    outcomes = await asyncio.gather(*(check(limits[i % 2], f"guesser:{i % 60}") for i in range(180)))
    assert sorted(outcomes) == ["checked"] * 120 + ["refused"] * 60  # two free failures per guesser
    for replica in limits:  # ...and the owner's check goes ahead at once, on either
        assert await check(replica, "oem:owner", right=True) == "checked"


async def test_concurrent_right_codes_wait_for_room_and_are_all_admitted(replicas: Replicas) -> None:
    limits = replicas(Rules(2))
    in_flight, most = 0, 0
    full = asyncio.Event()  # hold the checks until the free number are in flight together

    async def right_code(replica: FailureLimits) -> None:
        nonlocal in_flight, most
        slot = await replica.begin("oem", "dev")
        try:
            in_flight += 1
            most = max(most, in_flight)
            if in_flight == 2:
                full.set()
            await full.wait()
            in_flight -= 1
            await slot.succeeded()
        finally:
            await slot.release()

    await asyncio.gather(*(right_code(limits[i % 2]) for i in range(6)))  # none refused
    assert most == 2


async def test_a_dead_replicas_check_gives_its_slot_back_after_its_lease(postgres_url, clock) -> None:
    url = DatabaseUrl.parse(postgres_url)
    stores = [await AuditLog.open(url, migrate=True), await AuditLog.open(url)]
    try:
        first, second = (DatabaseLimits(s.db, clock=clock, rules=Rules(1)) for s in stores)
        assert await check(first, "oem:a") == "checked"
        clock.advance(2)
        await first.begin("oem:a", "dev")  # its replica dies: never reported
        looked = clock.reads
        waiting = asyncio.create_task(second.begin("oem:a", "dev"))
        # past the free failure one check at a time: the lost one still holds it, however often it looks
        await until(lambda: waiting.done() or clock.reads >= looked + 3, "three looks at the held slot")
        assert not waiting.done()
        clock.now += CHECK_LEASE  # its lease runs out: the slot comes back
        slot = await waiting
        await slot.failed()
        await slot.release()
    finally:
        for store in stores:
            await store.close()


def test_the_removed_per_device_ceiling_is_refused_at_start_up_naming_why() -> None:
    with pytest.raises(SettingsError, match=r"ACTIVATION_LIMITS_DEVICE_CEILING.*lock the owner out"):
        load_settings(env={"ACTIVATION_LIMITS_DEVICE_CEILING": "100"})
