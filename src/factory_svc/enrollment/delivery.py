"""``OutboxDelivery``: the background task that delivers queued enrollments to DPS, oldest first.

A batch at a time (``Outbox.with_next_batch``: up to ``CLAIM`` entries, each the oldest pending entry of
its device, so a device's entries go in order; on PostgreSQL each replica claims entries no other holds, and
an idle replica looks every second for entries the others queued: ``Outbox.idle_wait``).  New enrollments
go to DPS in bulk creates of ten (``BULK``), the batch's bulks at once; the entries a bulk wrote are marked
delivered (CREATED), together, once the batch is done.  An id DPS already holds (HTTP 409 for that record),
a bulk DPS refused as a whole, and every replacement take the one-by-one path: GET the enrollment, then
create it or update it etag-guarded.  While DPS is unreachable the loop waits (capped exponential backoff,
or DPS's Retry-After) and tries the same entries again; a refusal (e.g. the id is enrolled with another
certificate) marks the entry FAILED and moves on.

Exactly once in effect: a kill -9 after a bulk write and before the marks leaves those entries pending; the
next attempt's bulk create gets 409 for each of them, and the one-by-one path finds its own earlier write
(same certificate and activation-code hash in DPS) and marks the entry delivered (ALREADY_APPLIED) without
writing.  The ownership and replace rules (``ownership.py``) are applied to what DPS holds at delivery, and
a replacement is audited with the caller and the reason the entry carries.

Revocation is checked at delivery, inside the entries' claim (one ledger query for a batch): an entry
whose certificate was revoked after it was queued is not written; it is completed as FAILED with reason
CERTIFICATE_REVOKED (what GetEnrollmentStatus shows, with the state REVOKED) and audited
(``refuse-revoked``).  The check runs again after a write: a revocation that committed meanwhile may have
looked at DPS before the write, so the device's revocation intent is reopened (``RevocationCheck.enforce``;
the enrollment ends disabled) and the entry is completed the same way.  Either way its activation code
never enables anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
from dataclasses import dataclass

from factory_svc.enrollment.outbox import AuditRecord, Claimed, Outbox, OutboxEntry, OutboxMode
from factory_svc.enrollment.ownership import owner_refusal, replace_detail, replace_refusal
from factory_svc.enrollment.records import (
    RevocationCheck,
    enrolled_sha256,
    new_enrollment_of,
    revoked_error,
    with_certificate,
)
from factory_svc.errors import Reason
from provkit.clock import Clock
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
from provkit.errors import Reason as SharedReason
from provkit.faults import crash_point

log = logging.getLogger("factory_svc.outbox")

BULK = 10  # records in one DPS bulk operation (Azure's limit)
CLAIM = 8 * BULK  # entries claimed at once: their bulks go to DPS together, one per connection of its adapter


class Delivered(enum.Enum):
    CREATED = "created"
    REPLACED = "replaced"
    ALREADY_APPLIED = "already-applied"  # a retry found its own earlier write
    UNCHANGED = "unchanged"  # enrolled earlier with this certificate; the earlier code stays valid


@dataclass(frozen=True)
class NotDelivered:
    """DPS holds something this entry must not overwrite (the entry is marked failed)."""

    reason: str
    message: str


def _ours(existing: Enrollment, entry: OutboxEntry) -> bool:
    """The enrollment in DPS is exactly what this entry writes (a retry of an applied delivery)."""
    return enrolled_sha256(existing) == entry.sha256_thumbprint and existing.code_hash == entry.code_hash


class OutboxDelivery:
    def __init__(
        self,
        dps: EnrollmentPort,
        outbox: Outbox,
        clock: Clock,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        revocations: RevocationCheck | None = None,
    ) -> None:
        self._revocations = revocations
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
                handle = functools.partial(self._handle_batch, delay=delay)
                pause = await self._outbox.with_next_batch(CLAIM, handle)
                if pause is None:
                    await self._wait(self._outbox.idle_wait)
                elif pause > 0:
                    log.info("DPS unreachable; delivery paused", extra={"seconds": round(pause, 2)})
                    await asyncio.sleep(pause)  # the entry is let go meanwhile (another replica may try)
                    delay = min(self._max, delay * 2)
                else:
                    delay = self._initial
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox delivery error")
                await asyncio.sleep(min(self._max, delay))

    async def _handle_batch(self, claims: list[Claimed], delay: float) -> float:
        """Deliver the claimed entries (new enrollments in DPS bulk creates of ten, at once; replacements
        and anything a bulk did not settle one by one) and mark each; answer how long to pause before the
        next batch (0: none)."""
        pending = await self._not_revoked(claims, written=False)
        creates = [c for c in pending if c.entry.mode is OutboxMode.CREATE]
        singles = [c for c in pending if c.entry.mode is not OutboxMode.CREATE]
        outcomes = await asyncio.gather(
            *(self._create_bulk(creates[n : n + BULK], delay) for n in range(0, len(creates), BULK))
        )
        pause = max((p for p, _ in outcomes), default=0.0)
        singles += [claim for _, rest in outcomes for claim in rest]
        for claim in sorted(singles, key=lambda c: c.entry.seq):
            if pause > 0:  # DPS is unreachable: the rest stays pending, untried, for the next attempt
                break
            pause = await self._handle(claim, delay)
        return pause

    async def _not_revoked(self, claims: list[Claimed], *, written: bool) -> list[Claimed]:
        """The claims whose certificate is not revoked; the others are completed as refused (and, after a
        write, their revocation enforced again: see ``_refused_as_revoked``)."""
        if self._revocations is None or not claims:
            return claims
        revoked = await self._revocations.revoked_among([c.entry.sha256_thumbprint for c in claims])
        kept = []
        for claim in claims:
            if claim.entry.sha256_thumbprint not in revoked or not await self._refused_as_revoked(
                claim, written=written
            ):
                kept.append(claim)
        return kept

    async def _create_bulk(self, part: list[Claimed], delay: float) -> tuple[float, list[Claimed]]:
        """One DPS bulk create of up to ten new enrollments.  Answers the pause it calls for (DPS
        unreachable) and the claims left to the one-by-one path: an id DPS already holds (perhaps this very
        write, made by an attempt whose marks a crash lost: the one-by-one path recognises it), or a bulk
        DPS refused as a whole (one record may be at fault: each is tried alone)."""
        records = [
            new_enrollment_of(e.device_id, e.certificate_pem, e.code_hash, e.intent.owner)
            for e in (claim.entry for claim in part)
        ]
        try:
            errors = await self._dps.bulk_create(records)
        except CloudUnavailable as exc:
            for claim in part:
                await claim.record_attempt(SharedReason.DPS_UNAVAILABLE, str(exc))
            return min(self._max, max(delay, exc.retry_after or 0.0)), []
        except CloudRejected:
            return 0.0, part
        failed = {e.registration_id.lower(): e.error for e in errors}
        written: list[Claimed] = []
        retry: list[Claimed] = []
        for claim in part:
            error = failed.get(claim.entry.device_id.lower())
            if error is None:
                crash_point("outbox.after_dps_write")  # a retry recognises its own write
                written.append(claim)
            elif isinstance(error, CloudAlreadyExists):
                retry.append(claim)
            else:
                await claim.mark_failed(SharedReason.DPS_REFUSED, str(error))
                log.warning("queued enrollment refused by DPS", extra={"seq": claim.entry.seq})
        now = self._clock()  # one moment for the bulk: its marks are one statement
        for claim in await self._not_revoked(written, written=True):
            await claim.mark_delivered(Delivered.CREATED.value, now)
        log.info("queued enrollments delivered", extra={"delivered": len(written), "bulk": len(part)})
        return 0.0, retry

    async def _handle(self, claim: Claimed, delay: float) -> float:
        """Deliver the claimed entry and mark it; answer how long to pause before the next (0: none)."""
        entry = claim.entry
        with bind_device_id(entry.device_id):
            if await self._refused_as_revoked(claim, written=False):
                return 0.0
            try:
                outcome = await self.deliver(entry)
            except CloudUnavailable as exc:
                await claim.record_attempt(SharedReason.DPS_UNAVAILABLE, str(exc))
                return min(self._max, max(delay, exc.retry_after or 0.0))
            except CloudRejected as exc:
                await claim.mark_failed(SharedReason.DPS_REFUSED, str(exc))
                log.warning("queued enrollment refused by DPS", extra={"seq": entry.seq})
                return 0.0
            if isinstance(outcome, NotDelivered):
                await claim.mark_failed(outcome.reason, outcome.message)
                log.warning(
                    "queued enrollment not delivered", extra={"seq": entry.seq, "reason": outcome.reason}
                )
            else:
                crash_point("outbox.after_dps_write")  # a retry recognises its own write
                if await self._refused_as_revoked(claim, written=True):
                    return 0.0
                await claim.mark_delivered(outcome.value, self._clock())
                log.info("queued enrollment delivered", extra={"seq": entry.seq, "outcome": outcome.value})
            return 0.0

    async def _refused_as_revoked(self, claim: Claimed, *, written: bool) -> bool:
        """The entry's certificate is revoked: its revocation enforced (reopened, in case this or an earlier
        attempt wrote it to DPS), the refusal audited and the entry completed as FAILED
        (CERTIFICATE_REVOKED).  False when it is not revoked."""
        entry = claim.entry
        if self._revocations is None:
            return False
        revocation = await self._revocations.revocation_of(entry.sha256_thumbprint)
        if revocation is None:
            return False
        await self._revocations.enforce(entry.device_id)
        refusal = revoked_error(entry.sha256_thumbprint, revocation)
        when = "after it was written to DPS (disabled again)" if written else "before delivery (not written)"
        await self._outbox.record_audit(
            AuditRecord(
                self._clock(),
                "refuse-revoked",
                entry.device_id,
                entry.intent.caller,
                entry.intent.request_id,
                f"outbox entry {entry.seq}, sha256 {entry.sha256_thumbprint}: revoked "
                f"({revocation.reason.value}) {when}",
            )
        )
        await claim.mark_failed(refusal.reason, refusal.message)
        log.warning("queued enrollment refused: certificate revoked", extra={"seq": entry.seq})
        return True

    async def deliver(self, entry: OutboxEntry) -> Delivered | NotDelivered:
        """Write one entry (raises CloudUnavailable / CloudRejected)."""
        for _ in range(8):
            existing = await self._dps.get(entry.device_id)
            if existing is None:
                try:
                    await self._dps.create(
                        new_enrollment_of(
                            entry.device_id, entry.certificate_pem, entry.code_hash, entry.intent.owner
                        )
                    )
                except CloudAlreadyExists:
                    continue
                return Delivered.CREATED
            if _ours(existing, entry):
                return Delivered.ALREADY_APPLIED
            intent = entry.intent
            if entry.mode is OutboxMode.CREATE:
                if enrolled_sha256(existing) != entry.sha256_thumbprint:
                    return NotDelivered(
                        Reason.ENROLLMENT_EXISTS,
                        "the device is enrolled with another certificate; enroll again with replace",
                    )
                refusal = owner_refusal(existing, intent.owner)
                if refusal is not None:
                    return NotDelivered(refusal.reason, refusal.message)
                return Delivered.UNCHANGED
            refusal = replace_refusal(existing, intent.owner, intent.replace_reason)
            if refusal is not None:
                return NotDelivered(refusal.reason, refusal.message)
            replaced = with_certificate(existing, entry.certificate_pem, entry.code_hash, intent.owner)
            try:
                await self._dps.update(replaced)
            except (CloudEtagMismatch, CloudNotFound):
                continue
            detail = replace_detail(
                existing, intent.replace_reason, enrolled_sha256(existing), entry.sha256_thumbprint
            )
            await self._outbox.record_audit(
                AuditRecord(
                    self._clock(), "replace", entry.device_id, intent.caller, intent.request_id, detail
                )
            )
            return Delivered.REPLACED
        raise CloudUnavailable("the enrollment kept changing while delivering")
