"""Writing one linted enrollment: to DPS now (``live``), or to the outbox when DPS is unreachable
(``queue_many``).  The shared path of Enroll (``service``) and EnrollBatch (``batch``).

- ``live`` creates the DPS individual enrollment (X.509, registrationId = deviceId = the id, provisioning
  status *disabled*) through an ``EnrollmentPort``, or (with ``replace``) updates it, etag-guarded; an
  enrollment that holds this very certificate already is answered UNCHANGED with its retained code.
- ``queue_many`` puts enrollments in the ``Outbox`` (``OutboxDelivery`` delivers them later); a certificate
  already waiting there is answered with the waiting entry's code, never queued twice.
- Ownership and replace rules are ``ownership.py``'s: an owner OEM may be named (kept by every later
  Enroll), and replacing the enrollment of an activated or registered device needs a reason, keeps the owner
  and is audited with the caller (the outbox file's enrollment audit).
- A certificate the factory revoked (``RevocationCheck``: the ledger) is refused (CERTIFICATE_REVOKED).  The
  revocation is checked before the DPS write and once more after it: a revocation that committed meanwhile
  (and may have looked at DPS before the write) is enforced again (``RevocationCheck.enforce``: the device's
  revocation intent reopened, so the enrollment ends disabled) and the call answers CERTIFICATE_REVOKED.

Reasons raised: the lint reasons (``lint.py``), CERTIFICATE_REVOKED, ENROLLMENT_EXISTS (another certificate,
no ``replace``), OWNER_INVALID, REASON_INVALID, OWNER_CHANGE_NEEDS_TRANSFER, REPLACE_REASON_REQUIRED,
ENROLLMENT_CONCURRENTLY_MODIFIED, DPS_REFUSED.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from factory_svc.enrollment.codes import MAX_ATTEMPTS, CodeIssuer, NewCode
from factory_svc.enrollment.lint import (
    LintedCertificate,
    LintPolicy,
    inspect_certificate,
    verify_issued_by_factory,
)
from factory_svc.enrollment.model import (
    BatchItemResult,
    Delivery,
    EnrollOutcome,
    EnrollRequest,
    EnrollResult,
)
from factory_svc.enrollment.outbox import (
    AuditRecord,
    EntryIntent,
    NewEntry,
    Outbox,
    OutboxEntry,
    OutboxMode,
    OutboxState,
)
from factory_svc.enrollment.ownership import (
    check_owner,
    check_reason,
    owner_refusal,
    replace_detail,
    replace_refusal,
)
from factory_svc.enrollment.records import (
    RevocationCheck,
    enrolled_sha256,
    new_enrollment,
    revoked_error,
    with_certificate,
)
from factory_svc.enrollment.retained import code_id
from factory_svc.errors import Reason
from provkit.clock import Clock
from provkit.cloud import (
    CloudAlreadyExists,
    CloudEtagMismatch,
    CloudNotFound,
    CloudRejected,
    CloudUnavailable,
    EnrollmentPort,
)
from provkit.cloud_errors import CloudService, cloud_refused
from provkit.context import bind_device_id
from provkit.errors import Aborted, AlreadyExists
from provkit.errors import Reason as SharedReason
from provkit.faults import crash_point
from provkit.idempotency import fingerprint

log = logging.getLogger("factory_svc.enrollment")


def enroll_fingerprint(items: Sequence[EnrollRequest]) -> str:
    """The request as a fingerprint; owner and reason only when given (ids stored before they existed
    keep answering)."""
    return fingerprint(
        [
            [i.device_id.strip().lower(), i.certificate_pem.strip(), i.replace]
            + ([i.owner, i.replace_reason] if i.owner or i.replace_reason else [])
            for i in items
        ]
    )


def entry_intent(request: EnrollRequest) -> EntryIntent:
    return EntryIntent(request.owner, request.replace_reason, str(request.caller), request.request_id)


def result_json(result: EnrollResult) -> dict[str, Any]:
    return {
        "device_id": result.device_id,
        "outcome": result.outcome.value,
        "delivery": result.delivery.value,
        "sha1": result.sha1_thumbprint,
        "sha256": result.sha256_thumbprint,
        "code_id": result.code_id,
    }


def result_from_json(data: Mapping[str, Any]) -> EnrollResult:
    return EnrollResult(
        device_id=data["device_id"],
        outcome=EnrollOutcome(data["outcome"]),
        delivery=Delivery(data["delivery"]),
        activation_code=None,
        sha1_thumbprint=data["sha1"],
        sha256_thumbprint=data["sha256"],
        replayed=True,
        code_id=str(data.get("code_id", "")),
    )


@dataclass(frozen=True)
class BatchItem:
    """A batch item that passed the lint."""

    index: int
    linted: LintedCertificate
    request: EnrollRequest


@dataclass(frozen=True)
class LedgerLook:
    """What the ledger says of some inspected certificates, by SHA-256 thumbprint."""

    vouched: frozenset[str]  # issued by the factory under a current issuing CA: no signature check needed
    revoked: frozenset[str]


def item_result(item: BatchItem, result: EnrollResult) -> BatchItemResult:
    return BatchItemResult(item.index, item.linted.device_id, result, None)


class EnrollmentWriter:
    def __init__(
        self,
        dps: EnrollmentPort,
        outbox: Outbox,
        issuer: CodeIssuer,
        lint_policy: LintPolicy,
        clock: Clock,
        revocations: RevocationCheck | None = None,
    ) -> None:
        self._revocations = revocations
        self._dps = dps
        self._outbox = outbox
        self._issuer = issuer
        self._codes = issuer.retained
        self._lint = lint_policy
        self._clock = clock

    def inspect(self, request: EnrollRequest, field_prefix: str = "") -> LintedCertificate:
        """The request's checks but the certificate's signature (``looked_up`` says whether it needs one)."""
        check_owner(request.owner, field_prefix + "owner_oem")
        check_reason(request.replace_reason, field_prefix + "replace_reason")
        return inspect_certificate(
            request.device_id, request.certificate_pem, self._lint, self._clock(), field_prefix
        )

    def verify(self, linted: LintedCertificate, field_prefix: str = "") -> None:
        """The signature check of an inspected certificate (CERTIFICATE_UNTRUSTED)."""
        verify_issued_by_factory(linted, self._lint, field_prefix)

    async def looked_up(self, linted: Sequence[LintedCertificate]) -> LedgerLook:
        """One look in the ledger for all of ``linted``: which the factory issued under a current issuing CA
        certificate (that CA's key signed them: no signature check needed) and which it revoked."""
        if self._revocations is None or not linted:
            return LedgerLook(frozenset(), frozenset())
        recorded = await self._revocations.recorded_among(
            [item.sha256_thumbprint for item in linted], self._lint.issuer_pems
        )
        return LedgerLook(
            frozenset(t for t, standing in recorded.items() if standing.issued_under),
            frozenset(t for t, standing in recorded.items() if standing.revoked),
        )

    async def refuse_revoked(self, linted: LintedCertificate, field_prefix: str = "") -> None:
        if self._revocations is None:
            return
        revocation = await self._revocations.revocation_of(linted.sha256_thumbprint)
        if revocation is not None:
            raise revoked_error(linted.sha256_thumbprint, revocation, field_prefix)

    async def revoked_since(self, linted: LintedCertificate) -> None:
        """After a DPS write of the certificate: revoked meanwhile -> enforced again, CERTIFICATE_REVOKED."""
        if self._revocations is None:
            return
        revocation = await self._revocations.revocation_of(linted.sha256_thumbprint)
        if revocation is not None:
            await self._revocations.enforce(linted.device_id)
            raise revoked_error(linted.sha256_thumbprint, revocation)

    def result(
        self, linted: LintedCertificate, outcome: EnrollOutcome, delivery: Delivery, code: NewCode | None
    ) -> EnrollResult:
        return EnrollResult(
            linted.device_id,
            outcome,
            delivery,
            code[0] if code else None,
            linted.sha1_thumbprint,
            linted.sha256_thumbprint,
            code_id=code_id(code[1]) if code else "",
        )

    async def queue_many(
        self, items: Sequence[tuple[LintedCertificate, EnrollRequest, NewCode]]
    ) -> list[EnrollResult]:
        """Queue the items, in order.  A certificate that already waits in the outbox (a retry, or a re-run,
        while DPS is down) is not queued twice with another code that would never work: it is answered
        with the waiting entry's code while that is retained (and the code made for this call dropped)."""
        results: dict[int, EnrollResult] = {}
        entries: list[tuple[int, NewEntry, NewCode]] = []
        for k, (linted, request, code) in enumerate(items):
            waiting = None if request.replace else await self._waiting(linted)
            if waiting is not None:
                cid = code_id(waiting.code_hash)
                await self._codes.supersede(linted.device_id, cid)
                retained = await self._codes.find(linted.device_id, cid)
                earlier = (retained, waiting.code_hash) if retained is not None else None
                results[k] = self.result(linted, EnrollOutcome.QUEUED, Delivery.QUEUED, earlier)
                continue
            mode = OutboxMode.REPLACE if request.replace else OutboxMode.CREATE
            entry = NewEntry(
                linted.device_id,
                mode,
                linted.leaf_pem,
                code[1],
                linted.sha256_thumbprint,
                entry_intent(request),
            )
            entries.append((k, entry, code))
        if entries:
            await self._outbox.enqueue([entry for _, entry, _ in entries], self._clock())
            crash_point("enroll.after_queue")  # queued (and its codes retained), not yet answered
        for k, entry, code in entries:
            log.info("enrollment queued (DPS unreachable)", extra={"enrolled_device": entry.device_id})
            results[k] = self.result(items[k][0], EnrollOutcome.QUEUED, Delivery.QUEUED, code)
        return [results[k] for k in range(len(items))]

    async def _waiting(self, linted: LintedCertificate) -> OutboxEntry | None:
        """The outbox entry still waiting to deliver this very certificate, if any."""
        entry = await self._outbox.latest_for(linted.device_id)
        if entry is None or entry.state is not OutboxState.PENDING:
            return None
        return entry if entry.sha256_thumbprint == linted.sha256_thumbprint else None

    # ---------------------------------------------------------------------------------- live path
    async def live(
        self, linted: LintedCertificate, request: EnrollRequest, fresh: NewCode | None
    ) -> EnrollResult:
        """Create or (with ``replace``) update the enrollment now.  Raises CloudUnavailable."""
        for _ in range(MAX_ATTEMPTS):
            existing = await self._dps.get(linted.device_id)
            if existing is None:
                fresh = fresh or await self._issuer.new_code(linted.device_id)
                try:
                    await self._dps.create(new_enrollment(linted, fresh[1], request.owner))
                except CloudAlreadyExists:
                    continue
                except CloudRejected as exc:
                    raise cloud_refused(
                        exc, CloudService.DPS, what="the enrollment", with_status=True
                    ) from exc
                crash_point("enroll.after_dps_write")
                await self.revoked_since(linted)
                log.info("enrolled (disabled)", extra={"sha256": linted.sha256_thumbprint})
                return self.result(linted, EnrollOutcome.CREATED, Delivery.LIVE, fresh)
            enrolled = enrolled_sha256(existing)
            if not request.replace:
                if enrolled == linted.sha256_thumbprint:
                    refusal = owner_refusal(existing, request.owner)
                    if refusal is not None:
                        raise refusal
                    # a retry of an answer that was lost: the code is given again while it is retained
                    retained = await self._issuer.retained_code(existing)
                    await self._codes.supersede(linted.device_id, code_id(existing.code_hash))  # unused ones
                    return self.result(linted, EnrollOutcome.UNCHANGED, Delivery.LIVE, retained)
                raise AlreadyExists(
                    Reason.ENROLLMENT_EXISTS,
                    f"{linted.device_id} is enrolled with another certificate; set replace to rework it",
                    metadata={"enrolled_sha256": enrolled or ""},
                )
            refusal = replace_refusal(existing, request.owner, request.replace_reason)
            if refusal is not None:
                raise refusal
            fresh = fresh or await self._issuer.new_code(linted.device_id)
            try:
                await self._dps.update(with_certificate(existing, linted.leaf_pem, fresh[1], request.owner))
            except (CloudEtagMismatch, CloudNotFound):
                continue
            except CloudRejected as exc:
                raise cloud_refused(exc, CloudService.DPS, what="the enrollment", with_status=True) from exc
            crash_point("enroll.after_dps_write")
            await self._outbox.record_audit(
                AuditRecord(
                    self._clock(),
                    "replace",
                    linted.device_id,
                    str(request.caller),
                    request.request_id,
                    replace_detail(existing, request.replace_reason, enrolled, linted.sha256_thumbprint),
                )
            )
            await self._codes.supersede(linted.device_id, code_id(fresh[1]))
            await self.revoked_since(linted)
            log.info("enrollment replaced", extra={"sha256": linted.sha256_thumbprint})
            return self.result(linted, EnrollOutcome.REPLACED, Delivery.LIVE, fresh)
        raise Aborted(
            SharedReason.ENROLLMENT_CONCURRENTLY_MODIFIED,
            f"the enrollment of {linted.device_id} kept changing; try again",
        )

    async def enroll_linted(self, linted: LintedCertificate, request: EnrollRequest) -> EnrollResult:
        with bind_device_id(linted.device_id):
            if await self._outbox.pending_count() == 0:
                try:
                    return await self.live(linted, request, None)
                except CloudUnavailable:
                    pass
            return (
                await self.queue_many([(linted, request, await self._issuer.new_code(linted.device_id))])
            )[0]

    async def revoked_among(self, written: Sequence[LintedCertificate]) -> set[str]:
        """After a bulk DPS write: the certificates revoked meanwhile (each one's revocation enforced)."""
        if self._revocations is None or not written:
            return set()
        revoked = await self._revocations.revoked_among([linted.sha256_thumbprint for linted in written])
        for linted in written:
            if linted.sha256_thumbprint in revoked:
                await self._revocations.enforce(linted.device_id)
        return revoked
