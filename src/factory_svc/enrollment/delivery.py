"""``OutboxDelivery``: the background task that delivers queued enrollments to DPS, oldest first.

One entry at a time, in sequence order.  While DPS is unreachable the loop waits (capped exponential
backoff, or DPS's Retry-After) and tries the same entry again; a refusal (e.g. the id is enrolled with
another certificate) marks the entry FAILED and moves on.  A retry after a crash recognises its own earlier
write (same certificate and activation-code hash in DPS) and marks the entry delivered without writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

from factory_svc.enrollment.outbox import Outbox, OutboxEntry
from factory_svc.enrollment.service import enrolled_sha256
from provkit.activation_code import CODE_RECORD_KEY
from provkit.cloud import (
    CloudAlreadyExists,
    CloudEtagMismatch,
    CloudNotFound,
    CloudRejected,
    CloudUnavailable,
    Enrollment,
    EnrollmentPort,
)
from provkit.context import bind_device_id

log = logging.getLogger("factory_svc.outbox")


def _ours(existing: Enrollment, entry: OutboxEntry) -> bool:
    """The enrollment in DPS is exactly what this entry writes (a retry of an applied delivery)."""
    wanted = (entry.body.get("optionalDeviceInformation") or {}).get(CODE_RECORD_KEY)
    have = existing.optional_device_information.get(CODE_RECORD_KEY)
    return enrolled_sha256(existing) == entry.sha256_thumbprint and wanted == have


class OutboxDelivery:
    def __init__(
        self,
        dps: EnrollmentPort,
        outbox: Outbox,
        clock: Callable[[], datetime],
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self._dps = dps
        self._outbox = outbox
        self._clock = clock
        self._initial = backoff_initial
        self._max = backoff_max
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outbox-delivery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._outbox.changed.wait(), seconds)

    async def _run(self) -> None:
        delay = self._initial
        while True:
            try:
                self._outbox.changed.clear()  # before looking: an enqueue from now on wakes the wait below
                entry = await self._outbox.oldest_pending()
                if entry is None:
                    await self._wait(60.0)
                    continue
                with bind_device_id(entry.device_id):
                    try:
                        outcome = await self.deliver(entry)
                    except CloudUnavailable as exc:
                        await self._outbox.record_attempt(entry.seq, "DPS_UNAVAILABLE", str(exc))
                        pause = min(self._max, max(delay, exc.retry_after or 0.0))
                        log.info("DPS unreachable; delivery paused", extra={"seconds": round(pause, 2)})
                        await asyncio.sleep(pause)
                        delay = min(self._max, delay * 2)
                        continue
                    except CloudRejected as exc:
                        await self._outbox.mark_failed(entry.seq, "DPS_REFUSED", str(exc))
                        log.warning("queued enrollment refused by DPS", extra={"seq": entry.seq})
                        continue
                    delay = self._initial
                    if outcome.startswith("failed:"):
                        reason, _, message = outcome.removeprefix("failed:").partition(":")
                        await self._outbox.mark_failed(entry.seq, reason, message)
                        log.warning(
                            "queued enrollment not delivered", extra={"seq": entry.seq, "reason": reason}
                        )
                    else:
                        await self._outbox.mark_delivered(entry.seq, outcome, self._clock())
                        log.info("queued enrollment delivered", extra={"seq": entry.seq, "outcome": outcome})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox delivery error")
                await asyncio.sleep(min(self._max, delay))

    async def deliver(self, entry: OutboxEntry) -> str:
        """Write one entry: "created", "replaced", "already-applied", "unchanged" or "failed:REASON:msg"."""
        for _ in range(8):
            existing = await self._dps.get(entry.device_id)
            if existing is None:
                try:
                    await self._dps.create(entry.body)
                except CloudAlreadyExists:
                    continue
                return "created"
            if _ours(existing, entry):
                return "already-applied"
            same_cert = enrolled_sha256(existing) == entry.sha256_thumbprint
            if entry.mode == "create":
                if same_cert:
                    # Enrolled earlier with this certificate: nothing to do; the earlier code stays valid.
                    return "unchanged"
                return (
                    "failed:ENROLLMENT_EXISTS:the device is enrolled with another certificate; "
                    "enroll again with replace"
                )
            body = existing.body()
            for read_only in ("registrationState", "createdDateTimeUtc", "lastUpdatedDateTimeUtc"):
                body.pop(read_only, None)
            body["attestation"] = entry.body["attestation"]
            info = dict(body.get("optionalDeviceInformation") or {})
            info[CODE_RECORD_KEY] = entry.body["optionalDeviceInformation"][CODE_RECORD_KEY]
            body["optionalDeviceInformation"] = info
            try:
                await self._dps.update(body, existing.etag or "*")
            except (CloudEtagMismatch, CloudNotFound):
                continue
            return "replaced"
        raise CloudUnavailable("the enrollment kept changing while delivering")
