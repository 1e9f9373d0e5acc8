"""Refusals that anyone who reaches a port can cause, audited by kind: the first at once, repeats counted.

A call refused before anybody vouched for the caller (the gRPC gate of ``provkit.grpc_server``: no party
certificate, a role the access table does not allow; the allocation webhook: a wrong function key) costs
the caller one packet.  Written one durable row each, a flood of them would take the disk and the store's
writer lock from the legitimate writes queued behind, and grow the audit without bound.  So they pass
through a ``RefusalAggregator`` on their way to the service's ``RefusalLog``:

- The **kind** of a refusal is its reason, method (or endpoint), role seen and source (``Refusal.source``:
  the client certificate's CN and thumbprint, or the peer's address without its port for a caller without
  one; ``caller`` when no source is given).
- The **first** refusal of a kind is written at once, with everything it carries, before the caller gets
  its answer (as every refusal was before), and opens a **window** (``window`` seconds, default 60).
- **Repeats** of the kind inside the window are counted in memory, not written.  When the window closes
  (a timer, or ``close()`` at shutdown) one **summary** is written if there were any: a ``Refusal`` with
  ``repeats`` = how many, ``time`` = the first of them and ``until`` = the last (its ``detail`` reads
  "... and 1,234 more like this between T1 and T2").  The next refusal of the kind is a first again.
- **Bounded memory**: at most ``max_kinds`` windows are open (default 10,000).  A refusal of a new kind past
  that joins one overflow window, written and summarised the same way (reason ``KINDS_OVER_CAP``:
  "... and N more of other kinds"), never dropped unrecorded; its kind is then not written on its own.

Every refusal is still logged and counted on ``/metrics`` by its caller (``devprov_refusals_total``, the
webhook's ``devprov_http_requests_total``): the aggregator changes what is written, not what is counted,
nor what the refused caller is answered.  A repeat is answered without waiting for a write, a first after
its write: the difference tells a caller only whether its own kind (its own source, method and reason) was
refused lately, nothing about devices or other parties.

Refusals an authenticated party causes (a device the webhook refuses after a correct key, an authorised
caller's bad request, a wrong activation code) do not come here: they are per device, the audit needs each
one, and nobody without credentials can cause them.

Crash story: a first occurrence is durable before its answer is sent; the repeats of the windows still open
live only in memory, so kill -9 (or a power cut) loses at most those counts, never a first occurrence nor
a summary already written (crash point ``refusal_audit.repeat_counted``: a repeat counted, not answered).
A graceful stop (SIGTERM) writes every open window's summary before the store closes.  A first whose write
fails is not remembered (the refusal's log line still holds it): the next of its kind is a first again.  A
first whose caller goes away (cancelled) is still written, and its window stays open.

API
---
``RefusalAuditSettings(window=60.0, max_kinds=10_000)``
``RefusalAggregator(log, settings=RefusalAuditSettings(), *, monotonic=time.monotonic)`` a ``RefusalLog``:
    ``async record_refusal(refusal)``; ``async flush_due() -> int`` (close the windows whose time is up,
    what the timer does; the number of summaries written); ``async close()`` (stop the timer, write every
    open window's summary).  The timer starts with the first refusal.
``KINDS_OVER_CAP``  the overflow summary's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from provkit.authz import KINDS_OVER_CAP, Refusal, RefusalLog
from provkit.faults import crash_point

__all__ = ["KINDS_OVER_CAP", "RefusalAggregator", "RefusalAuditSettings"]

log = logging.getLogger("provkit.refusal_audit")

Kind = tuple[str, str, str, str]
_OVERFLOW: Kind = (KINDS_OVER_CAP, "", "", "")


@dataclass(frozen=True)
class RefusalAuditSettings:
    window: float = 60.0  # seconds a kind's repeats are counted before its summary is written
    max_kinds: int = 10_000  # open windows at most; refusals of further kinds share one overflow window

    def __post_init__(self) -> None:
        if not 0 < self.window < math.inf:  # NaN too: every window would close at once, inf: never
            raise ValueError("the refusal audit window must be a positive number of seconds")
        if self.max_kinds < 1:
            raise ValueError("the refusal audit needs room for at least one kind")


@dataclass
class _Window:
    summary: Refusal  # what the summary row says besides its count and times
    closes: float  # monotonic seconds
    repeats: int = 0
    # the times only: a repeat itself (a device id of megabytes, say) is not kept for each open window
    first_repeat: datetime | None = None
    last_repeat: datetime | None = None


def kind_of(refusal: Refusal) -> Kind:
    return (refusal.reason, refusal.method, refusal.role, refusal.source or refusal.caller)


class RefusalAggregator:
    """Writes the first refusal of each kind at once and counts its repeats per window (module docstring)."""

    def __init__(
        self,
        log: RefusalLog,
        settings: RefusalAuditSettings | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._settings = settings or RefusalAuditSettings()
        self._monotonic = monotonic
        # Every window lasts as long, so insertion order is closing order: the timer looks at the front.
        self._windows: dict[Kind, _Window] = {}
        self._timer: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()  # the timer's summaries are never cut short by close()
        self._writing: set[asyncio.Future[None]] = set()  # first writes under way (their callers may be gone)
        self._closed = False

    @property
    def open_kinds(self) -> int:
        return len(self._windows)

    async def record_refusal(self, refusal: Refusal) -> None:
        kind = kind_of(refusal)
        window = self._windows.get(kind)
        if window is None and len(self._windows) >= self._settings.max_kinds:
            kind = _OVERFLOW
            window = self._windows.get(kind)
        if window is not None:
            window.repeats += 1
            window.first_repeat = window.first_repeat or refusal.time
            window.last_repeat = refusal.time
            crash_point("refusal_audit.repeat_counted")  # counted in memory only: a crash loses the count
            return
        summary = _overflow_summary(refusal) if kind == _OVERFLOW else _summary_of(refusal)
        window = _Window(summary, self._monotonic() + self._settings.window)
        self._windows[kind] = window  # before the write: refusals arriving meanwhile are its repeats
        self._start_timer()
        # The write goes on when the caller goes away (a refused client may cancel every call at once, and
        # the store commits a write it was handed all the same): the window stays unless the write fails.
        write = asyncio.ensure_future(self._log.record_refusal(refusal))
        self._writing.add(write)
        write.add_done_callback(lambda done: self._first_written(kind, window, done))
        await asyncio.shield(write)

    def _first_written(self, kind: Kind, window: _Window, write: asyncio.Future[None]) -> None:
        self._writing.discard(write)
        failed = write.cancelled() or write.exception() is not None
        if failed and self._windows.get(kind) is window:
            # Not remembered as written: the next refusal of the kind is a first again.  What arrived
            # during the failed write is counted in the log lines of each refusal, not here.
            del self._windows[kind]

    async def flush_due(self) -> int:
        """Close the windows whose time is up, writing their summaries; how many summaries were written."""
        now = self._monotonic()
        due: list[_Window] = []
        while self._windows:
            kind, window = next(iter(self._windows.items()))
            if window.closes > now:
                break
            del self._windows[kind]
            due.append(window)
        return await self._write_summaries(due)

    async def close(self) -> None:
        """Stop the timer and write the summary of every open window (a graceful shutdown)."""
        self._closed = True
        async with self._flushing:  # the timer is asleep or waiting for this lock: stopped in either
            if self._timer is not None:
                self._timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._timer
                self._timer = None
            if self._writing:  # a first's write lands before the store closes, and its window stays
                await asyncio.gather(*self._writing, return_exceptions=True)
            windows, self._windows = list(self._windows.values()), {}
            await self._write_summaries(windows)

    async def _write_summaries(self, windows: list[_Window]) -> int:
        written = 0
        for window in windows:
            if not window.repeats:
                continue
            assert window.first_repeat is not None and window.last_repeat is not None
            summary = replace(
                window.summary, time=window.first_repeat, repeats=window.repeats, until=window.last_repeat
            )
            try:
                await self._log.record_refusal(summary)
                written += 1
            except Exception:  # the store is failing: the log line keeps the count
                log.exception(
                    "could not audit a summary of refused calls",
                    extra={"reason": summary.reason, "method": summary.method, "repeats": summary.repeats},
                )
        return written

    def _start_timer(self) -> None:
        if self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().create_task(self._run(), name="refusal-audit")

    async def _run(self) -> None:
        while True:
            front = next(iter(self._windows.values()), None)
            # a window opened while this sleeps closes later than the front one, or than now + window
            wait = self._settings.window if front is None else front.closes - self._monotonic()
            await asyncio.sleep(max(wait, 0.0))
            try:
                async with self._flushing:
                    await self.flush_due()
            except Exception:  # never let the timer die: the next round tries again
                log.exception("refusal audit timer failed")


def _summary_of(first: Refusal) -> Refusal:
    """A summary says who, what and why as its kind's first did; no request or device of its own."""
    return replace(first, device_id="", request_id="")


def _overflow_summary(first: Refusal) -> Refusal:
    return Refusal(first.time, "", "", "", "", "", KINDS_OVER_CAP)
