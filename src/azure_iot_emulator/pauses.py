"""Where the event loop stops: every garbage-collector pause and every stall of the loop, as JSON lines.

Opt-in (``pause_log``: ``serve --pause-log FILE``), for finding what delays acknowledgements under load.
Three sources, because a sampling profiler sees CPU, not pauses:

- the collector: :data:`gc.callbacks` brackets each collection, so its duration and generation are exact;
  every full (generation 2) collection is written, a younger one only when it took ``gc_threshold`` or
  more;
- the loop: a ticker sleeps ``tick`` seconds and measures how late it woke up.  Lateness past
  ``stall_threshold`` is a stall: something ran on the loop thread that long without yielding (a
  collection, a long callback, a burst of work), or the thread waited (for a core on a busy machine, in
  a blocking call): the thread's CPU time over the same span tells which.  uvloop has no slow-callback
  log, so lateness is the honest measure; a stall's cause is whatever else the log shows at that time;
- the telemetry group commit (:meth:`PauseRecorder.watching` wraps the store's metrics): each commit of
  ``stall_threshold`` or more, its fsync included, since it runs on the loop.

Each line is ``{"t": unix time at the end, "kind": "gc" | "stall" | "commit", "ms": duration, ...}``
(for ``gc`` also ``gen`` and ``collected``, the unreachable objects it found; for ``gc`` and ``stall``
``cpu_ms``, the CPU the loop's thread used meanwhile: on a busy machine the rest is waiting for a
core).  Lines are kept in memory and written once a second (not from inside the collector), and at
:meth:`stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from azure_iot_emulator.hub.telemetry import TelemetryMetrics

TICK = 0.010
STALL_THRESHOLD = 0.020
GC_THRESHOLD = 0.001
FLUSH_EVERY = 1.0


class PauseRecorder:
    """Records pauses of the current process into ``path`` (appended).  ``clock`` (monotonic seconds) and
    ``wall`` (unix seconds) are injectable for tests."""

    def __init__(
        self,
        path: Path,
        *,
        tick: float = TICK,
        stall_threshold: float = STALL_THRESHOLD,
        gc_threshold: float = GC_THRESHOLD,
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self.path = path
        self.tick = tick
        self.stall_threshold = stall_threshold
        self.gc_threshold = gc_threshold
        self._clock = clock
        self._wall = wall
        self._cpu = cpu
        self._pending: list[dict[str, Any]] = []
        self._gc_started: float | None = None
        self._gc_cpu = 0.0
        self._file: IO[str] | None = None
        self._ticker: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Hook the collector and start the ticker (on the running loop)."""
        gc.callbacks.append(self.on_gc)
        self._ticker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.on_gc in gc.callbacks:
            gc.callbacks.remove(self.on_gc)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    # ---------------------------------------------------------------------------------- the sources
    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """A :data:`gc.callbacks` entry: ``start`` and ``stop`` of one collection."""
        if phase == "start":
            self._gc_started, self._gc_cpu = self._clock(), self._cpu()
            return
        started, self._gc_started = self._gc_started, None
        if started is None:  # hooked in the middle of a collection
            return
        seconds, cpu_seconds = self._clock() - started, self._cpu() - self._gc_cpu
        generation = info.get("generation", -1)
        if generation == 2 or seconds >= self.gc_threshold:
            self._pending.append(
                {
                    "t": self._wall(),
                    "kind": "gc",
                    "ms": round(seconds * 1000, 3),
                    "cpu_ms": round(cpu_seconds * 1000, 3),
                    "gen": generation,
                    "collected": info.get("collected", 0),
                }
            )

    def woke(self, expected: float, now: float, cpu_seconds: float) -> None:
        """The ticker was due at ``expected`` and ran at ``now`` (both from ``clock``); the loop's thread
        used ``cpu_seconds`` of CPU meanwhile (far less than the lateness: it was waiting for a core or
        in a blocking call, not working)."""
        late = now - expected
        if late >= self.stall_threshold:
            self._pending.append(
                {
                    "t": self._wall(),
                    "kind": "stall",
                    "ms": round(late * 1000, 3),
                    "cpu_ms": round(cpu_seconds * 1000, 3),
                }
            )

    async def _run(self) -> None:
        clock, cpu, tick = self._clock, self._cpu, self.tick
        flushed = clock()
        while True:
            expected, used = clock() + tick, cpu()
            await asyncio.sleep(tick)
            now = clock()
            self.woke(expected, now, cpu() - used)
            if now - flushed >= FLUSH_EVERY:
                self.flush()
                flushed = now

    def committed(self, seconds: float) -> None:
        """A telemetry group commit took ``seconds`` on the loop (its fsync included)."""
        if seconds >= self.stall_threshold:
            self._pending.append({"t": self._wall(), "kind": "commit", "ms": round(seconds * 1000, 3)})

    def watching(self, metrics: TelemetryMetrics | None) -> TelemetryMetrics:
        """``metrics`` (the telemetry store's), also telling this log of every long commit."""
        return _CommitWatch(metrics, self)

    # --------------------------------------------------------------------------------------- output
    def flush(self) -> None:
        records, self._pending = self._pending, []
        if not records:
            return
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write("".join(json.dumps(record) + "\n" for record in records))
        self._file.flush()


def refuse_foreign(path: Path) -> str | None:
    """Why ``path`` must not be appended to as a pause log (None: it is one, empty, or not there yet).

    The log is appended to: pointed by mistake at another file (the emulator's database, a key), it would
    append JSON lines to it.  A file that exists must be a regular file whose first line is a record."""
    if not path.exists():
        return None
    if not path.is_file():
        return f"pause_log {path} is not a regular file"
    with path.open("rb") as existing:
        first = existing.readline(4096)
    if not first:
        return None
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not (isinstance(record, dict) and "kind" in record and "t" in record):
        return f"pause_log {path} exists and is not a pause log (refusing to append to it)"
    return None


def read(path: Path) -> list[dict[str, Any]]:
    """The records of a pause log, oldest first (a torn last line, from a killed process, is skipped)."""
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


class _CommitWatch:
    def __init__(self, inner: TelemetryMetrics | None, recorder: PauseRecorder) -> None:
        self._inner = inner
        self._recorder = recorder

    def telemetry(self, hub_counts: Mapping[str, tuple[int, int]], seconds: float) -> None:
        if self._inner is not None:
            self._inner.telemetry(hub_counts, seconds)
        self._recorder.committed(seconds)
