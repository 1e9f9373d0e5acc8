"""provkit.refusal_audit: the first refusal of a kind written at once, its repeats counted per window and
summarised, a cap on the kinds held; driven by an injected clock (no sleeps, no timer)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from support.clock import ManualClock

from provkit.authz import KINDS_OVER_CAP, Refusal
from provkit.refusal_audit import RefusalAggregator, RefusalAuditSettings

METHOD = "/devprov.v1.FactoryService/MintCertificate"


class Written:
    """The refusal log the aggregator writes to: what reached it, in order."""

    def __init__(self) -> None:
        self.rows: list[Refusal] = []
        self.failing = False

    async def record_refusal(self, refusal: Refusal) -> None:
        if self.failing:
            raise OSError("disk full")
        self.rows.append(refusal)

    def total(self) -> int:
        """How many refusals the rows stand for."""
        return sum(r.repeats or 1 for r in self.rows)  # a first row is one, a summary its repeats


def refusal(
    at: datetime,
    n: int,
    reason: str = "CLIENT_CERTIFICATE_REQUIRED",
    source: str = "tls-anonymous:ipv4:127.0.0.1",
    method: str = METHOD,
) -> Refusal:
    caller = f"{source.split(':')[0]}:peer-{n}"
    return Refusal(at, method, caller, "", f"device-{n}", f"request-{n}", reason, source)


def aggregator(
    window: float = 60.0, max_kinds: int = 10_000
) -> tuple[RefusalAggregator, Written, ManualClock]:
    written, ticks = Written(), ManualClock(1000.0)
    settings = RefusalAuditSettings(window, max_kinds)
    return RefusalAggregator(written, settings, monotonic=ticks), written, ticks


async def test_a_flood_of_one_kind_is_its_first_row_and_one_summary_when_the_window_closes() -> None:
    audit, written, ticks = aggregator()
    wall = ManualClock()
    first = refusal(wall(), 0)
    await audit.record_refusal(first)
    assert written.rows == [first]  # written at once, with everything it carries
    for n in range(1, 500):
        wall.advance(0.1)
        ticks.advance(0.1)
        await audit.record_refusal(refusal(wall(), n))
    assert written.rows == [first]
    assert await audit.flush_due() == 0  # 49.9 s: the window is still open
    ticks.advance(10.5)  # past 60 s
    assert await audit.flush_due() == 1
    [_, summary] = written.rows
    assert summary.repeats == 499 and written.total() == 500
    assert (summary.reason, summary.method, summary.caller, summary.source) == (
        first.reason,
        first.method,
        first.caller,
        first.source,
    )
    assert (summary.device_id, summary.request_id) == ("", "")  # a summary has no request of its own
    assert summary.time == first.time + timedelta(seconds=0.1)  # the first repeat
    assert summary.until == wall()
    assert summary.detail == (
        "CLIENT_CERTIFICATE_REQUIRED role=- method=/devprov.v1.FactoryService/MintCertificate and 499 more "
        "like this between 2026-01-01T00:00:00.100+00:00 and 2026-01-01T00:00:49.900+00:00"
    )
    assert audit.open_kinds == 0
    # the window closed: the next refusal of the kind is a first again
    again = refusal(wall(), 500)
    await audit.record_refusal(again)
    assert written.rows[-1] == again and written.total() == 501


async def test_another_reason_method_role_or_source_is_a_kind_of_its_own() -> None:
    audit, written, _ = aggregator()
    at = ManualClock()()
    kinds = [
        refusal(at, 0),
        refusal(at, 1, reason="CALLER_IDENTITY_UNRECOGNISED"),
        refusal(at, 2, method="/devprov.v1.FactoryService/Enroll"),
        refusal(at, 3, source="tls-anonymous:ipv4:127.0.0.2"),
        Refusal(at, METHOD, "urn:devprov:oem:acme x", "oem", "", "r", "CALLER_NOT_AUTHORIZED", "x sha256:AB"),
        Refusal(at, METHOD, "urn:devprov:oem:acme y", "oem", "", "r", "CALLER_NOT_AUTHORIZED", "y sha256:CD"),
    ]
    for each in kinds:
        await audit.record_refusal(each)
    assert written.rows == kinds
    # the same peer address from another port (another connection) is the same kind
    await audit.record_refusal(refusal(at, 9))
    assert len(written.rows) == len(kinds)
    await audit.close()
    assert [r.repeats for r in written.rows] == [0] * len(kinds) + [1]


async def test_a_kind_without_a_source_is_told_apart_by_its_caller() -> None:
    audit, written, _ = aggregator()
    at = ManualClock()()
    for caller in ("a", "b", "a"):
        await audit.record_refusal(Refusal(at, METHOD, caller, "", "", "", "CLIENT_CERTIFICATE_REQUIRED"))
    assert [r.caller for r in written.rows] == ["a", "b"]


async def test_past_the_cap_new_kinds_share_one_overflow_window_and_are_summarised() -> None:
    audit, written, ticks = aggregator(max_kinds=3)
    wall = ManualClock()
    for n in range(3):
        await audit.record_refusal(refusal(wall(), n, source=f"tls-anonymous:ipv4:127.0.0.{n + 1}"))
    assert audit.open_kinds == 3
    over = [refusal(wall.advance(1), 10 + n, source=f"tls-anonymous:ipv4:127.0.1.{n}") for n in range(50)]
    for each in over:
        await audit.record_refusal(each)
    # a known kind still counts in its own window
    await audit.record_refusal(refusal(wall.advance(1), 99, source="tls-anonymous:ipv4:127.0.0.1"))
    assert audit.open_kinds == 4  # the three kinds and the overflow: never more
    assert written.rows[3] == over[0]  # the overflow's first, in full
    assert len(written.rows) == 4
    ticks.advance(60)
    assert await audit.flush_due() == 2
    own, overflow = written.rows[4:]
    assert (own.source, own.repeats) == ("tls-anonymous:ipv4:127.0.0.1", 1)
    assert (overflow.reason, overflow.repeats) == (KINDS_OVER_CAP, 49)
    assert (overflow.time, overflow.until) == (over[1].time, over[-1].time)
    assert overflow.detail.startswith(f"{KINDS_OVER_CAP} role=- method=- and 49 more of other kinds between ")
    assert written.total() == 3 + 50 + 1


async def test_close_writes_the_open_windows_and_a_window_without_repeats_writes_nothing() -> None:
    audit, written, ticks = aggregator()
    at = ManualClock()()
    await audit.record_refusal(refusal(at, 0))
    await audit.record_refusal(refusal(at, 1, reason="CALLER_IDENTITY_UNRECOGNISED"))
    for n in range(2, 7):
        await audit.record_refusal(refusal(at, n))
    ticks.advance(1)
    await audit.close()
    assert [(r.reason, r.repeats) for r in written.rows] == [
        ("CLIENT_CERTIFICATE_REQUIRED", 0),
        ("CALLER_IDENTITY_UNRECOGNISED", 0),
        ("CLIENT_CERTIFICATE_REQUIRED", 5),
    ]
    assert audit.open_kinds == 0 and written.total() == 7


async def test_windows_close_in_the_order_they_opened() -> None:
    audit, written, ticks = aggregator(window=10)
    at = ManualClock()()
    for n, source in enumerate(("tls-anonymous:ipv4:127.0.0.1", "tls-anonymous:ipv4:127.0.0.2")):
        await audit.record_refusal(refusal(at, n, source=source))
        await audit.record_refusal(refusal(at, n, source=source))
        ticks.advance(5)
    assert await audit.flush_due() == 1  # 10 s after the first: only its window
    assert [r.source for r in written.rows if r.repeats] == ["tls-anonymous:ipv4:127.0.0.1"]
    ticks.advance(5)
    assert await audit.flush_due() == 1 and audit.open_kinds == 0


async def test_a_first_that_could_not_be_written_is_not_remembered() -> None:
    audit, written, _ = aggregator()
    at = ManualClock()()
    written.failing = True
    with pytest.raises(OSError):
        await audit.record_refusal(refusal(at, 0))
    written.failing = False
    retried = refusal(at, 1)
    await audit.record_refusal(retried)
    assert written.rows == [retried]  # written as a first, not counted as a repeat of a lost one


async def test_a_summary_that_could_not_be_written_leaves_the_aggregator_working() -> None:
    audit, written, ticks = aggregator()
    at = ManualClock()()
    await audit.record_refusal(refusal(at, 0))
    await audit.record_refusal(refusal(at, 1))
    written.failing = True
    ticks.advance(60)
    assert await audit.flush_due() == 0
    written.failing = False
    await audit.record_refusal(refusal(at, 2))
    assert [r.request_id for r in written.rows] == ["request-0", "request-2"]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        RefusalAuditSettings(window=0)
    with pytest.raises(ValueError):
        RefusalAuditSettings(max_kinds=0)


class Held(Written):
    """A refusal log whose writes wait until released, and then land whoever still waits for them (as the
    stores' do: a write handed to the store's thread commits even when its caller was cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.asked = 0

    async def record_refusal(self, refusal: Refusal) -> None:
        self.asked += 1
        self.started.set()
        await asyncio.shield(self._land(refusal))

    async def _land(self, refusal: Refusal) -> None:
        await self.release.wait()
        await super().record_refusal(refusal)


async def test_a_caller_that_goes_away_during_its_first_write_does_not_make_the_next_a_first() -> None:
    # A refused caller can cancel its call at once (the server then cancels its handler): were its kind
    # forgotten, every cancelled call would be a first, a durable row each, and the flood one row per call.
    held = Held()
    audit = RefusalAggregator(held, RefusalAuditSettings(), monotonic=ManualClock(1000.0))
    at = ManualClock()()
    gone = asyncio.create_task(audit.record_refusal(refusal(at, 0)))
    await held.started.wait()
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    more = [asyncio.create_task(audit.record_refusal(refusal(at, n))) for n in range(1, 4)]
    for _ in range(3):
        await asyncio.sleep(0)  # let them run
    # meanwhile, more of the kind: repeats, answered without a write
    assert [task.done() for task in more] == [True] * 3 and held.asked == 1
    held.release.set()
    await audit.close()  # waits for the first's write, then writes the summary
    assert [(r.request_id, r.repeats) for r in held.rows] == [("request-0", 0), ("", 3)]


async def test_a_window_holds_no_repeat_it_counted() -> None:
    # what a refused caller sends (a device id of megabytes) is not kept for each of 10,000 open windows
    audit, _, _ = aggregator()
    at = ManualClock()()
    await audit.record_refusal(refusal(at, 0))
    repeat = replace(refusal(at, 1), device_id="x" * 1_000_000)
    seen = weakref.ref(repeat)
    await audit.record_refusal(repeat)
    del repeat
    gc.collect()
    assert seen() is None
