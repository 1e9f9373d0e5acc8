"""The renewals' enrollment writes, grouped: concurrent renewals' etag-guarded DPS writes go out together as
one DPS bulk enrollment operation (``updateIfMatchETag``, at most ``MAX_BULK`` = 10 records, Azure's limit)
instead of one call each.

No write waits for company: while fewer than ``PARALLEL`` bulk calls are in flight, a write goes out at
once (a group of one); the writes that arrive while all are in flight go out together as soon as one
returns.  Each caller waits for the bulk call that holds its record and gets that record's own outcome
(``CloudEtagMismatch`` when it changed or vanished since it was read; another item's failure is not its
failure); a failed call fails every record it held.  A group holds one record per enrollment (a second
write of the same enrollment waits for the next group: DPS answers an item's failure by its registration
id).
"""

from __future__ import annotations

import asyncio
import contextlib

from provkit.cloud import CloudError, Enrollment, EnrollmentPort

MAX_BULK = 10  # DPS: "Bulk device enrollment operation with maximum of 10 enrollments"
PARALLEL = 4  # bulk calls in flight at once (the DPS adapter keeps 8 connections)


class GroupedWrites:
    def __init__(self, dps: EnrollmentPort, size: int = MAX_BULK, parallel: int = PARALLEL) -> None:
        self._dps = dps
        self._size = size
        self._parallel = parallel
        self._waiting: list[tuple[Enrollment, asyncio.Future[None]]] = []
        self._senders: set[asyncio.Task[None]] = set()

    async def update(self, enrollment: Enrollment) -> None:
        """Write ``enrollment`` if its etag still is DPS's (``CloudEtagMismatch`` otherwise, or the
        ``CloudError`` of the bulk call that held it)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((enrollment, done))
        if len(self._senders) < self._parallel:
            sender = asyncio.create_task(self._send(), name="renewal-enrollment-writes")
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        await done

    def _group(self) -> list[tuple[Enrollment, asyncio.Future[None]]]:
        group: list[tuple[Enrollment, asyncio.Future[None]]] = []
        later: list[tuple[Enrollment, asyncio.Future[None]]] = []
        ids: set[str] = set()
        for item in self._waiting:
            enrollment, done = item
            if done.done():  # its caller gave up (cancelled): nothing to write
                continue
            if len(group) < self._size and enrollment.registration_id not in ids:
                ids.add(enrollment.registration_id)
                group.append(item)
            else:
                later.append(item)
        self._waiting = later
        return group

    async def _send(self) -> None:
        while self._waiting:
            group = self._group()
            if not group:
                continue
            try:
                failures = await self._dps.bulk_update([enrollment for enrollment, _ in group])
            except (CloudError, ValueError) as exc:
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            except BaseException as exc:  # cancelled (shut down): no caller is left waiting
                for _, done in (*group, *self._waiting):
                    if not done.done():
                        done.set_exception(exc if isinstance(exc, Exception) else CloudError("stopped"))
                raise
            failed = {failure.registration_id: failure.error for failure in failures}
            if set(failed) - {enrollment.registration_id for enrollment, _ in group}:  # whose was it?
                unknown = CloudError(f"DPS reported a failure it did not attribute: {failures}")
                failed = {enrollment.registration_id: unknown for enrollment, _ in group}
            for enrollment, done in group:
                if done.done():
                    continue
                error = failed.get(enrollment.registration_id)
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    async def close(self) -> None:
        for sender in list(self._senders):
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
