"""The quota buckets (pure, with a clock the test moves)."""

from __future__ import annotations

from support.clock import ManualClock

from azure_iot_emulator.quotas import DpsQuotas, TokenBuckets, hub_d2c


def test_dps_service_operations_burst_to_1000_then_refill_at_the_average_rate():
    clock = ManualClock(1000.0)
    quotas = DpsQuotas(clock)
    assert all(quotas.operations.take() is None for _ in range(1000))
    assert quotas.operations.take() == 1  # 1000/min: the next token in 60 ms, said as 1 s
    clock.now += 0.07
    assert quotas.operations.take() is None
    assert quotas.operations.take(n=10) == 1
    clock.now += 60
    assert quotas.operations.take(n=1000) is None


def test_polling_is_5_per_10_seconds_per_device_and_a_refusal_costs_nothing():
    clock = ManualClock(1000.0)
    polls = DpsQuotas(clock).polls
    assert [polls.take("dev-a") for _ in range(5)] == [None] * 5
    assert polls.take("dev-a") == 2  # 0.5 poll/s
    assert polls.take("dev-a") == 2
    assert polls.take("dev-b") is None  # another device has its own bucket
    clock.now += 2
    assert polls.take("dev-a") is None
    assert polls.take("dev-a") == 2


def test_registrations_have_their_own_bucket():
    clock = ManualClock(1000.0)
    quotas = DpsQuotas(clock)
    for _ in range(1000):
        quotas.operations.take()
    assert quotas.registrations.take() is None


def test_hub_d2c_shapes_by_tier():
    clock = ManualClock(1000.0)
    s1 = hub_d2c("s1", clock)
    assert s1.delay("hub", 100) == 0.0
    assert s1.delay("hub", 50) == 0.5  # 50 over the 100/s rate: half a second late
    clock.now += 0.5
    assert s1.delay("hub", 1) == 0.01
    s3 = hub_d2c("S3", clock)
    assert s3.delay("hub", 5000) == 0.0


def test_full_buckets_are_forgotten():
    clock = ManualClock(1000.0)
    buckets = TokenBuckets(DpsQuotas(clock).polls.limit, clock)
    for n in range(10_001):
        buckets.take(f"dev-{n}")
    clock.now += 20
    buckets.take("one-more")
    assert len(buckets._buckets) <= 2
