"""The pause log (``pauses.py``): which collector pauses and loop stalls it writes, with what, and that
it catches a real stall of the event loop and a real full collection."""

from __future__ import annotations

import asyncio
import gc
import time

from azure_iot_emulator.pauses import PauseRecorder, read


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def recorder(tmp_path, clock: Clock) -> PauseRecorder:
    return PauseRecorder(
        tmp_path / "pauses.jsonl",
        stall_threshold=0.020,
        gc_threshold=0.001,
        clock=clock,
        wall=lambda: 5e8,
        cpu=lambda: clock.now / 2,  # the thread had half of the wall time
    )


def collection(rec: PauseRecorder, clock: Clock, generation: int, seconds: float, collected: int = 0) -> None:
    rec.on_gc("start", {"generation": generation, "collected": 0, "uncollectable": 0})
    clock.now += seconds
    rec.on_gc("stop", {"generation": generation, "collected": collected, "uncollectable": 0})


def test_every_full_collection_and_only_the_longer_young_ones_are_written(tmp_path) -> None:
    clock = Clock()
    rec = recorder(tmp_path, clock)
    collection(rec, clock, 0, 0.0004)  # a young collection under the threshold: not written
    collection(rec, clock, 1, 0.0025, collected=7)
    collection(rec, clock, 2, 0.0002)  # a full one, however short
    rec.on_gc("stop", {"generation": 2, "collected": 0, "uncollectable": 0})  # no start seen: ignored
    rec.flush()
    assert read(tmp_path / "pauses.jsonl") == [
        {"t": 5e8, "kind": "gc", "ms": 2.5, "cpu_ms": 1.25, "gen": 1, "collected": 7},
        {"t": 5e8, "kind": "gc", "ms": 0.2, "cpu_ms": 0.1, "gen": 2, "collected": 0},
    ]


def test_lateness_past_the_threshold_is_a_stall(tmp_path) -> None:
    rec = recorder(tmp_path, Clock())
    rec.woke(expected=10.0, now=10.019, cpu_seconds=0.019)
    rec.woke(expected=11.0, now=11.25, cpu_seconds=0.004)
    rec.flush()
    assert read(tmp_path / "pauses.jsonl") == [{"t": 5e8, "kind": "stall", "ms": 250.0, "cpu_ms": 4.0}]


def test_long_telemetry_commits_are_written_and_the_store_metrics_still_see_every_commit(tmp_path) -> None:
    seen: list[float] = []

    class Metrics:
        def telemetry(self, hub_counts, seconds: float) -> None:
            seen.append(seconds)

    rec = recorder(tmp_path, Clock())
    watched = rec.watching(Metrics())
    watched.telemetry({"hub": (3, 90)}, 0.002)
    watched.telemetry({"hub": (1, 30)}, 0.120)
    rec.flush()
    assert seen == [0.002, 0.120]
    assert read(tmp_path / "pauses.jsonl") == [{"t": 5e8, "kind": "commit", "ms": 120.0}]


def test_a_torn_last_line_is_skipped(tmp_path) -> None:
    path = tmp_path / "pauses.jsonl"
    path.write_text('{"t": 1, "kind": "stall", "ms": 30}\n{"t": 2, "kind": "st')
    assert read(path) == [{"t": 1, "kind": "stall", "ms": 30}]
    assert read(tmp_path / "absent.jsonl") == []


async def test_a_blocked_loop_and_a_full_collection_are_recorded(tmp_path) -> None:
    path = tmp_path / "pauses.jsonl"
    rec = PauseRecorder(path)
    rec.start()
    try:
        await asyncio.sleep(0.05)  # the ticker is waiting
        time.sleep(0.3)  # blocking the loop is the point
        await asyncio.sleep(0.05)  # the ticker wakes up late
        gc.collect()
    finally:
        await rec.stop()
    records = read(path)
    stalls = [r for r in records if r["kind"] == "stall"]
    assert stalls and max(r["ms"] for r in stalls) >= 250  # at least the 300 ms the loop was held
    assert any(r["kind"] == "gc" and r["gen"] == 2 for r in records)
    assert rec.on_gc not in gc.callbacks
