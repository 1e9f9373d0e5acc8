"""The wrong-code limit held in PostgreSQL by two replicas at once: the counts per caller+device are exact
across them, no number of failing callers refuses another, a success clears the pair, and a check whose
replica died gives its slot back when its lease runs out."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from support.clock import ManualClock
from support.waiting import until

from activation_svc.audit import AuditLog
from activation_svc.ratelimit import AttemptsExhausted
from activation_svc.shared_limits import CHECK_LEASE, DatabaseLimits, Rules, Slot
from dbstore import DatabaseUrl


@pytest.fixture
async def replicas(postgres_url):
    """Two audit stores (as two replicas open them) on one database, and a shared clock."""
    url = DatabaseUrl.parse(postgres_url)
    stores = [await AuditLog.open(url, migrate=True), await AuditLog.open(url)]
    yield stores, ManualClock(datetime(2026, 5, 1, 12, 0, tzinfo=UTC))
    for store in stores:
        await store.close()


async def _wrong(limits: DatabaseLimits, caller: str, device: str) -> str:
    try:
        slot = await limits.begin(caller, device)
    except AttemptsExhausted:
        return "refused"
    try:
        await asyncio.sleep(0.01)  # the check takes a moment: others arrive meanwhile
        await slot.failed()
        return "checked"
    finally:
        await slot.release()


async def test_wrong_codes_from_both_replicas_are_counted_exactly(replicas):
    stores, clock = replicas
    limits = [DatabaseLimits(s.db, clock=clock, rules=Rules(3)) for s in stores]
    outcomes = await asyncio.gather(*(_wrong(limits[i % 2], "oem:a", "dev-1") for i in range(12)))
    assert sorted(outcomes) == ["checked"] * 3 + ["refused"] * 9
    clock.now += timedelta(seconds=2)  # the back-off after the 3 free failures: one more check, on either
    outcomes = await asyncio.gather(*(_wrong(limits[i % 2], "oem:a", "dev-1") for i in range(4)))
    assert sorted(outcomes) == ["checked"] + ["refused"] * 3
    # another party is not slowed by oem:a's failures
    assert await _wrong(limits[1], "oem:b", "dev-1") == "checked"


async def test_many_callers_failing_on_both_replicas_never_refuse_the_owner(replicas):
    stores, clock = replicas
    limits = [DatabaseLimits(s.db, clock=clock, rules=Rules(2)) for s in stores]
    outcomes = await asyncio.gather(
        *(_wrong(limits[i % 2], f"guesser:{i % 60}", "dev-2") for i in range(180))
    )
    assert sorted(outcomes) == ["checked"] * 120 + ["refused"] * 60  # two free failures per guesser
    for replica in limits:
        slot: Slot = await replica.begin("oem:owner", "dev-2")  # at once, on either replica
        await slot.succeeded()
        await slot.release()


async def test_a_success_clears_the_pair_and_a_dead_replica_s_check_comes_back(replicas):
    stores, clock = replicas
    first, second = (DatabaseLimits(s.db, clock=clock, rules=Rules(1)) for s in stores)
    assert await _wrong(first, "oem:a", "dev-3") == "checked"
    clock.now += timedelta(seconds=2)
    slot: Slot = await second.begin("oem:a", "dev-3")
    await slot.succeeded()
    await slot.release()
    assert await _wrong(first, "oem:a", "dev-3") == "checked"  # cleared: the free failure again
    clock.now += timedelta(seconds=2)
    await first.begin("oem:a", "dev-3")  # its replica dies: never reported
    looked = clock.reads
    waiting = asyncio.create_task(second.begin("oem:a", "dev-3"))
    # past the free failure one check at a time: the lost one still holds it, however often it looks
    await until(lambda: waiting.done() or clock.reads >= looked + 3, "three looks at the held slot")
    assert not waiting.done()
    clock.now += CHECK_LEASE  # its lease runs out: the slot comes back
    slot = await waiting
    await slot.failed()
    await slot.release()
