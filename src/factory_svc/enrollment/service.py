"""Enroll, EnrollBatch and GetEnrollmentStatus: the enrollment domain (no gRPC, no Azure SDK).

- ``EnrollmentService`` creates DPS individual enrollments (X.509, registrationId = deviceId = the id,
  provisioning status *disabled*) through an ``EnrollmentPort``, after the preflight lint.  It reads and
  writes ``provkit.cloud.Enrollment`` records; the DPS JSON is the adapter's.
- When DPS is unreachable (``CloudUnavailable``) -- or while older entries still wait, to keep the order --
  the enrollment goes to the ``Outbox`` and ``OutboxDelivery`` delivers it later.
- Request ids go through ``provkit.idempotency`` (answers kept in the outbox's database; replicas reserve
  an id there before the work).
- Every new activation code is retained, encrypted (``RetainedCodes``), before its hash is written to DPS,
  so a retry -- same request id, or a re-run that finds the device UNCHANGED -- returns it again until the
  MES acknowledges the label (``acknowledge_codes``) or the retention window passes.  ``rotate_code``
  replaces a device's code hash (etag-guarded) when its code is lost or its label damaged.
- The service owns its worker threads (code hashing, batch lint): ``close()`` shuts them down.

Ownership and replace rules are ``ownership.py``'s: an owner OEM may be named (kept by every later
Enroll), and replacing the enrollment of an activated or registered device needs a reason, keeps the
owner and is audited with the caller (the outbox file's enrollment audit).

A certificate the factory revoked (``RevocationLookup``: the ledger) is refused (CERTIFICATE_REVOKED), and
the status of an enrollment holding one is REVOKED.  The revocation is checked before the DPS write and
once more after it: a revocation that committed meanwhile (and may have looked at DPS before the write)
is enforced again (``RevocationLookup.enforce``: the device's revocation intent reopened, so the
enrollment ends disabled) and the call answers CERTIFICATE_REVOKED.

Reasons raised: the lint reasons (``lint.py``), CERTIFICATE_REVOKED, ENROLLMENT_EXISTS (another
certificate, no ``replace``), OWNER_INVALID, REASON_INVALID, OWNER_CHANGE_NEEDS_TRANSFER,
REPLACE_REASON_REQUIRED, ENROLLMENT_CONCURRENTLY_MODIFIED, DPS_REFUSED, DPS_UNAVAILABLE, BATCH_EMPTY,
BATCH_TOO_LARGE, DUPLICATE_IN_BATCH, REQUEST_ID_INVALID, REQUEST_ID_REUSED; rotation: ENROLLMENT_NOT_FOUND,
ENROLLMENT_PENDING; acknowledgement: DEVICE_IDS_EMPTY, DEVICE_IDS_TOO_MANY.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from factory_svc.enrollment.lint import LintedCertificate, LintPolicy, lint_certificate
from factory_svc.enrollment.model import (
    AcknowledgeResult,
    BatchItemResult,
    BatchResult,
    Delivery,
    EnrollmentState,
    EnrollmentStatus,
    EnrollOutcome,
    EnrollPolicy,
    EnrollRequest,
    EnrollResult,
    ItemError,
    RotateResult,
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
    OwnershipService,
    check_owner,
    check_reason,
    owner_refusal,
    replace_detail,
    replace_refusal,
)
from factory_svc.enrollment.retained import RetainedCodes, code_id
from factory_svc.model import Revocation
from provkit.activation_code import new_codes
from provkit.clock import Clock
from provkit.cloud import (
    CloudAlreadyExists,
    CloudError,
    CloudEtagMismatch,
    CloudNotFound,
    CloudRejected,
    CloudUnavailable,
    Enrollment,
    EnrollmentPort,
    ProvisioningStatus,
    X509Attestation,
)
from provkit.context import bind_device_id, current_caller
from provkit.device_id import normalise_device_id
from provkit.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    ErrorKind,
    FailedPrecondition,
    NotFound,
    Unavailable,
    invalid_field,
)
from provkit.faults import crash_point
from provkit.idempotency import LOST_RACE, LostRace, RequestIds, Stored, check_request_id, fingerprint

log = logging.getLogger("factory_svc.enrollment")

R = TypeVar("R")  # an answer of a request

NewCode = tuple[str, dict[str, Any]]  # the code handed out once, and the hash record DPS keeps
_MAX_ATTEMPTS = 8
_BULK = 10
# Worker threads, one pool for hashing activation codes, one for linting batch items.  scrypt and the
# ECDSA check release the GIL, but each must take it back afterwards, and while another thread runs Python
# that waits up to the interpreter's switch interval (5 ms): one hashing thread then manages ~230 hashes/s
# whatever the cores.  So: several threads.  (Measured beside a busy Python thread: 1 hashing thread 229/s,
# 2: 475/s, 4 and 8: ~775/s, which was all the CPU left.)  A job is one DPS bulk operation's worth (ten
# codes): half the hand-overs of five per job, ~6 % less CPU per enrollment.
_WORKER_THREADS = max(4, min(16, 4 * (os.cpu_count() or 2)))
_HASH_JOB = 10


# -------------------------------------------------------------------------------------------- enrollments
def new_enrollment_of(
    device_id: str, certificate_pem: str, code_hash: Mapping[str, Any], owner: str = ""
) -> Enrollment:
    """A fresh enrollment (registration id = device id): disabled until the OEM activates it."""
    return Enrollment(
        registration_id=device_id,
        device_id=device_id,
        provisioning_status=ProvisioningStatus.DISABLED,
        attestation=X509Attestation(certificate_pem),
        code_hash=code_hash,
        owner=owner or None,
    )


def new_enrollment(linted: LintedCertificate, code_hash: Mapping[str, Any], owner: str = "") -> Enrollment:
    return new_enrollment_of(linted.device_id, linted.leaf_pem, code_hash, owner)


def with_certificate(
    existing: Enrollment, certificate_pem: str, code_hash: Mapping[str, Any], owner: str = ""
) -> Enrollment:
    """``existing`` holding another certificate and code hash (the old code stops working); the owner is
    kept, or ``owner`` when none was named yet; everything else kept."""
    return dc_replace(
        existing,
        attestation=X509Attestation(certificate_pem),
        code_hash=code_hash,
        owner=existing.owner or owner or None,
    )


def enrolled_sha256(enrollment: Enrollment) -> str | None:
    """The SHA-256 thumbprint of the certificate an enrollment holds (from the PEM, else DPS's info)."""
    pem = enrollment.attestation.certificate_pem
    if pem and "BEGIN CERTIFICATE" in pem:
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
            return cert.fingerprint(hashes.SHA256()).hex().upper()
        except ValueError:
            pass
    return enrollment.attestation.sha256_thumbprint


def _fingerprint(items: Sequence[EnrollRequest]) -> str:
    """The request as a fingerprint; owner and reason only when given (ids stored before they existed
    keep answering)."""
    return fingerprint(
        [
            [i.device_id.strip().lower(), i.certificate_pem.strip(), i.replace]
            + ([i.owner, i.replace_reason] if i.owner or i.replace_reason else [])
            for i in items
        ]
    )


def _intent(request: EnrollRequest) -> EntryIntent:
    return EntryIntent(request.owner, request.replace_reason, str(request.caller), request.request_id)


def _result_json(result: EnrollResult) -> dict[str, Any]:
    return {
        "device_id": result.device_id,
        "outcome": result.outcome.value,
        "delivery": result.delivery.value,
        "sha1": result.sha1_thumbprint,
        "sha256": result.sha256_thumbprint,
        "code_id": result.code_id,
    }


def _result_from_json(data: Mapping[str, Any]) -> EnrollResult:
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


def _refused(exc: CloudError) -> DomainError:
    return FailedPrecondition(
        "DPS_REFUSED", f"DPS refused the enrollment: {exc}", metadata={"status": str(exc.status)}
    )


@dataclass(frozen=True)
class _Item:
    """A batch item that passed the lint."""

    index: int
    linted: LintedCertificate
    request: EnrollRequest


def _item_result(item: _Item, result: EnrollResult) -> BatchItemResult:
    return BatchItemResult(item.index, item.linted.device_id, result, None)


# ------------------------------------------------------------------------------------------------ service
class RevocationLookup(Protocol):
    async def revocation_of(self, sha256_thumbprint: str) -> Revocation | None: ...

    async def revoked_among(self, sha256_thumbprints: Sequence[str]) -> set[str]: ...

    async def enforce(self, device_id: str) -> None:
        """A revoked certificate of the device was written to DPS: have its revocation steps run again."""
        ...


def revoked_error(
    sha256_thumbprint: str, revocation: Revocation | None, field_prefix: str = ""
) -> DomainError:
    """CERTIFICATE_REVOKED for the certificate with this thumbprint."""
    when = f" ({revocation.reason.value}, {revocation.time.isoformat()})" if revocation is not None else ""
    metadata = {"sha256_thumbprint": sha256_thumbprint}
    if revocation is not None:
        metadata["revocation_reason"] = revocation.reason.value
    return FailedPrecondition(
        "CERTIFICATE_REVOKED",
        f"{field_prefix}certificate_pem was revoked{when}; mint a new certificate",
        metadata=metadata,
    )


class EnrollmentService:
    def __init__(
        self,
        dps: EnrollmentPort,
        outbox: Outbox,
        codes: RetainedCodes,
        lint_policy: LintPolicy,
        policy: EnrollPolicy,
        clock: Clock,
        revocations: RevocationLookup | None = None,
        request_ids: RequestIds | None = None,
    ) -> None:
        self._revocations = revocations
        self._dps = dps
        self._outbox = outbox
        self._codes = codes
        self._lint = lint_policy
        self._policy = policy
        self._clock = clock
        # one for every RPC here (their ids share one answer table): reservations in the outbox's database
        self._request_ids = request_ids or RequestIds(outbox.reservations)
        self.ownership = OwnershipService(dps, outbox, clock, self._request_ids)  # TransferOwnership
        self._hashers = ThreadPoolExecutor(max_workers=_WORKER_THREADS, thread_name_prefix="code-hash")
        self._linters = ThreadPoolExecutor(max_workers=_WORKER_THREADS, thread_name_prefix="enroll-lint")

    def close(self) -> None:
        """Stop the worker threads (after the last request)."""
        self._hashers.shutdown(wait=True)
        self._linters.shutdown(wait=True)

    # ------------------------------------------------------------------------------------- helpers
    async def _new_code(self, device_id: str) -> NewCode:
        return (await self._new_codes([device_id]))[0]

    async def _new_codes(self, device_ids: Sequence[str]) -> list[NewCode]:
        """A code for each device, hashed in the hashing threads (ten per job), and retained (encrypted,
        committed) before anyone can write its hash to DPS."""
        count = len(device_ids)
        log2_n = self._policy.code_hash_log2_n
        loop = asyncio.get_running_loop()
        jobs = [min(_HASH_JOB, count - k) for k in range(0, count, _HASH_JOB)]
        parts = await asyncio.gather(
            *(loop.run_in_executor(self._hashers, _hash_job, n, log2_n) for n in jobs)
        )
        codes = [item for part in parts for item in part]
        await self._codes.retain(
            [(d, code, record) for d, (code, record) in zip(device_ids, codes, strict=True)], self._clock()
        )
        return codes

    def lint(self, request: EnrollRequest, field_prefix: str = "") -> LintedCertificate:
        check_owner(request.owner, field_prefix + "owner_oem")
        check_reason(request.replace_reason, field_prefix + "replace_reason")
        return lint_certificate(
            request.device_id, request.certificate_pem, self._lint, self._clock(), field_prefix
        )

    async def _refuse_revoked(self, linted: LintedCertificate, field_prefix: str = "") -> None:
        if self._revocations is None:
            return
        revocation = await self._revocations.revocation_of(linted.sha256_thumbprint)
        if revocation is not None:
            raise revoked_error(linted.sha256_thumbprint, revocation, field_prefix)

    async def _revoked_since(self, linted: LintedCertificate) -> None:
        """After a DPS write of the certificate: revoked meanwhile -> enforced again, CERTIFICATE_REVOKED."""
        if self._revocations is None:
            return
        revocation = await self._revocations.revocation_of(linted.sha256_thumbprint)
        if revocation is not None:
            await self._revocations.enforce(linted.device_id)
            raise revoked_error(linted.sha256_thumbprint, revocation)

    def _result(
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

    async def _retained_code(self, enrollment: Enrollment) -> NewCode | None:
        """The code whose hash the enrollment holds, while it is retained."""
        record = enrollment.code_hash
        code = await self._codes.find(enrollment.registration_id, code_id(record))
        return None if code is None or record is None else (code, dict(record))

    async def _queue_many(
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
                results[k] = self._result(linted, EnrollOutcome.QUEUED, Delivery.QUEUED, earlier)
                continue
            mode = OutboxMode.REPLACE if request.replace else OutboxMode.CREATE
            entry = NewEntry(
                linted.device_id, mode, linted.leaf_pem, code[1], linted.sha256_thumbprint, _intent(request)
            )
            entries.append((k, entry, code))
        if entries:
            await self._outbox.enqueue([entry for _, entry, _ in entries], self._clock())
            crash_point("enroll.after_queue")  # queued (and its codes retained), not yet answered
        for k, entry, code in entries:
            log.info("enrollment queued (DPS unreachable)", extra={"enrolled_device": entry.device_id})
            results[k] = self._result(items[k][0], EnrollOutcome.QUEUED, Delivery.QUEUED, code)
        return [results[k] for k in range(len(items))]

    async def _waiting(self, linted: LintedCertificate) -> OutboxEntry | None:
        """The outbox entry still waiting to deliver this very certificate, if any."""
        entry = await self._outbox.latest_for(linted.device_id)
        if entry is None or entry.state is not OutboxState.PENDING:
            return None
        return entry if entry.sha256_thumbprint == linted.sha256_thumbprint else None

    # ---------------------------------------------------------------------------------- live path
    async def _live(
        self, linted: LintedCertificate, request: EnrollRequest, fresh: NewCode | None
    ) -> EnrollResult:
        """Create or (with ``replace``) update the enrollment now.  Raises CloudUnavailable."""
        for _ in range(_MAX_ATTEMPTS):
            existing = await self._dps.get(linted.device_id)
            if existing is None:
                fresh = fresh or await self._new_code(linted.device_id)
                try:
                    await self._dps.create(new_enrollment(linted, fresh[1], request.owner))
                except CloudAlreadyExists:
                    continue
                except CloudRejected as exc:
                    raise _refused(exc) from exc
                crash_point("enroll.after_dps_write")
                await self._revoked_since(linted)
                log.info("enrolled (disabled)", extra={"sha256": linted.sha256_thumbprint})
                return self._result(linted, EnrollOutcome.CREATED, Delivery.LIVE, fresh)
            enrolled = enrolled_sha256(existing)
            if not request.replace:
                if enrolled == linted.sha256_thumbprint:
                    refusal = owner_refusal(existing, request.owner)
                    if refusal is not None:
                        raise refusal
                    # a retry of an answer that was lost: the code is given again while it is retained
                    retained = await self._retained_code(existing)
                    await self._codes.supersede(linted.device_id, code_id(existing.code_hash))  # unused ones
                    return self._result(linted, EnrollOutcome.UNCHANGED, Delivery.LIVE, retained)
                raise AlreadyExists(
                    "ENROLLMENT_EXISTS",
                    f"{linted.device_id} is enrolled with another certificate; set replace to rework it",
                    metadata={"enrolled_sha256": enrolled or ""},
                )
            refusal = replace_refusal(existing, request.owner, request.replace_reason)
            if refusal is not None:
                raise refusal
            fresh = fresh or await self._new_code(linted.device_id)
            try:
                await self._dps.update(with_certificate(existing, linted.leaf_pem, fresh[1], request.owner))
            except (CloudEtagMismatch, CloudNotFound):
                continue
            except CloudRejected as exc:
                raise _refused(exc) from exc
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
            await self._revoked_since(linted)
            log.info("enrollment replaced", extra={"sha256": linted.sha256_thumbprint})
            return self._result(linted, EnrollOutcome.REPLACED, Delivery.LIVE, fresh)
        raise Aborted(
            "ENROLLMENT_CONCURRENTLY_MODIFIED",
            f"the enrollment of {linted.device_id} kept changing; try again",
        )

    async def _enroll_linted(self, linted: LintedCertificate, request: EnrollRequest) -> EnrollResult:
        with bind_device_id(linted.device_id):
            if await self._outbox.pending_count() == 0:
                try:
                    return await self._live(linted, request, None)
                except CloudUnavailable:
                    pass
            return (await self._queue_many([(linted, request, await self._new_code(linted.device_id))]))[0]

    # ------------------------------------------------------------------------------------ requests
    async def _stored(self, request_id: str) -> Stored[dict[str, Any]] | None:
        found = await self._outbox.find_request(request_id)
        return None if found is None else Stored(found[0], found[1])

    async def enroll(self, request: EnrollRequest) -> EnrollResult:
        check_request_id(request.request_id)
        linted = self.lint(request)
        await self._refuse_revoked(linted)
        return await self._once(
            request.request_id,
            _fingerprint([request]),
            lambda: self._enroll_linted(linted, request),
            _result_json,
            self._replayed_result,
        )

    async def enroll_batch(self, requests: Sequence[EnrollRequest], request_id: str = "") -> BatchResult:
        check_request_id(request_id)
        self._check_size("items", len(requests), "BATCH_EMPTY", "BATCH_TOO_LARGE")
        request_fingerprint = _fingerprint(requests)
        requests = [dc_replace(r, request_id=request_id) for r in requests]  # the batch's, for the audit
        return await self._once(
            request_id,
            request_fingerprint,
            lambda: self._enroll_batch(requests),
            _batch_json,
            self._replayed_batch,
        )

    def _check_size(self, field: str, count: int, empty_reason: str, too_many_reason: str) -> None:
        if count == 0:
            raise invalid_field(field, empty_reason, f"{field} is empty")
        if count > self._policy.max_batch:
            raise invalid_field(
                field, too_many_reason, f"at most {self._policy.max_batch} {field} per call (got {count})"
            )

    async def _once(
        self,
        request_id: str,
        request_fingerprint: str,
        work: Callable[[], Awaitable[R]],
        to_json: Callable[[R], dict[str, Any]],
        replay: Callable[[Mapping[str, Any]], Awaitable[R]],
    ) -> R:
        """``work`` once per request id: its answer is stored (outbox file) and a retry replays it."""

        async def execute() -> R | LostRace:
            result = await work()
            if request_id and not await self._outbox.remember_request(
                request_id, request_fingerprint, to_json(result)
            ):
                return LOST_RACE  # a replica that took the id over answered first: its answer stands
            return result

        return await self._request_ids.run(
            request_id,
            request_fingerprint,
            find=lambda: self._stored(request_id),
            replay=replay,
            execute=execute,
        )

    async def _enroll_batch(self, requests: Sequence[EnrollRequest]) -> BatchResult:
        results: list[BatchItemResult] = []
        valid: list[_Item] = []
        seen: set[str] = set()
        outcomes = await self._lint_many(requests)
        for index, (request, linted) in enumerate(zip(requests, outcomes, strict=True)):
            if not isinstance(linted, DomainError):
                try:
                    await self._refuse_revoked(linted, f"items[{index}].")
                except DomainError as exc:
                    linted = exc
            if isinstance(linted, DomainError):
                results.append(_error_item(index, request.device_id, linted))
            elif linted.device_id in seen:
                duplicate = ItemError(
                    ErrorKind.INVALID_ARGUMENT,
                    "DUPLICATE_IN_BATCH",
                    "this device id appears earlier in the batch",
                )
                results.append(BatchItemResult(index, linted.device_id, None, duplicate))
            else:
                seen.add(linted.device_id)
                valid.append(_Item(index, linted, request))
        results.extend(await self._enroll_many(valid))
        return BatchResult(tuple(sorted(results, key=lambda r: r.index)))

    async def _lint_many(self, requests: Sequence[EnrollRequest]) -> list[LintedCertificate | DomainError]:
        """Each item linted (or its lint error), in worker threads a bulk's worth at a time: the signature
        check releases the GIL, so it runs beside the event loop instead of in it."""
        loop = asyncio.get_running_loop()
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(self._linters, self._lint_part, start, requests[start : start + _BULK])
                for start in range(0, len(requests), _BULK)
            )
        )
        return [item for part in parts for item in part]

    def _lint_part(self, start: int, part: Sequence[EnrollRequest]) -> list[LintedCertificate | DomainError]:
        out: list[LintedCertificate | DomainError] = []
        for offset, request in enumerate(part):
            try:
                out.append(self.lint(request, f"items[{start + offset}]."))
            except DomainError as exc:
                out.append(exc)
        return out

    async def _enroll_many(self, valid: Sequence[_Item]) -> list[BatchItemResult]:
        """The linted items: new ones in bulk operations of ten (at most ``bulk_concurrency`` at a time),
        replacements one by one; everything to the outbox while older entries wait there."""
        if not valid:
            return []
        if await self._outbox.pending_count() > 0:
            codes = await self._new_codes([item.linted.device_id for item in valid])
            queued = await self._queue_many(
                [(item.linted, item.request, code) for item, code in zip(valid, codes, strict=True)]
            )
            return [_item_result(item, result) for item, result in zip(valid, queued, strict=True)]
        creates = [item for item in valid if not item.request.replace]
        replaces = [item for item in valid if item.request.replace]
        gate = asyncio.Semaphore(self._policy.bulk_concurrency)
        bulks = await asyncio.gather(
            *(self._create_bulk(creates[n : n + _BULK], gate) for n in range(0, len(creates), _BULK))
        )
        results = [result for bulk in bulks for result in bulk]
        codes = await self._new_codes([item.linted.device_id for item in replaces]) if replaces else []
        for item, code in zip(replaces, codes, strict=True):
            results.append(await self._enroll_item(item, code))
        return results

    async def _create_bulk(self, part: Sequence[_Item], gate: asyncio.Semaphore) -> list[BatchItemResult]:
        """One DPS bulk create for up to ten new items.  Their codes are hashed first (worker threads), so
        the first operation leaves after ten hashes and hashing overlaps with writing to DPS; an id DPS
        already holds is retried on the single-record path (it may hold this very certificate)."""
        codes = await self._new_codes([item.linted.device_id for item in part])
        records = [
            new_enrollment(item.linted, record, item.request.owner)
            for item, (_, record) in zip(part, codes, strict=True)
        ]
        async with gate:
            try:
                errors = await self._dps.bulk_create(records)
            except CloudUnavailable:
                queued = await self._queue_many(
                    [(item.linted, item.request, code) for item, code in zip(part, codes, strict=True)]
                )
                return [_item_result(item, result) for item, result in zip(part, queued, strict=True)]
            except CloudRejected as exc:
                return [_error_item(item.index, item.linted.device_id, _refused(exc)) for item in part]
        crash_point("enroll.after_dps_write")
        failed = {e.registration_id.lower(): e.error for e in errors}
        revoked = await self._revoked_among(
            [item.linted for item in part if item.linted.device_id not in failed]
        )
        results = []
        for item, code in zip(part, codes, strict=True):
            error = failed.get(item.linted.device_id)
            if item.linted.sha256_thumbprint in revoked:
                results.append(
                    _error_item(
                        item.index,
                        item.linted.device_id,
                        revoked_error(item.linted.sha256_thumbprint, None, f"items[{item.index}]."),
                    )
                )
            elif error is None:
                created = self._result(item.linted, EnrollOutcome.CREATED, Delivery.LIVE, code)
                results.append(_item_result(item, created))
            elif isinstance(error, CloudAlreadyExists):
                results.append(await self._enroll_item(item, code))
            else:
                results.append(_error_item(item.index, item.linted.device_id, _refused(error)))
        return results

    async def _revoked_among(self, written: Sequence[LintedCertificate]) -> set[str]:
        """After a bulk DPS write: the certificates revoked meanwhile (each one's revocation enforced)."""
        if self._revocations is None or not written:
            return set()
        revoked = await self._revocations.revoked_among([linted.sha256_thumbprint for linted in written])
        for linted in written:
            if linted.sha256_thumbprint in revoked:
                await self._revocations.enforce(linted.device_id)
        return revoked

    async def _enroll_item(self, item: _Item, code: NewCode) -> BatchItemResult:
        """One batch item on the single-record path (live, else queued), or its error."""
        with bind_device_id(item.linted.device_id):
            try:
                try:
                    result = await self._live(item.linted, item.request, code)
                except CloudUnavailable:
                    result = (await self._queue_many([(item.linted, item.request, code)]))[0]
            except DomainError as exc:
                return _error_item(item.index, item.linted.device_id, exc)
        return _item_result(item, result)

    # ---------------------------------------------------------------------------------------- codes
    async def _with_codes(self, results: Sequence[EnrollResult]) -> dict[str, str]:
        """The retained codes of replayed results, by device id."""
        keys = [(r.device_id, r.code_id) for r in results if r.code_id]
        found = await self._codes.find_many(keys)
        return {device_id: code for (device_id, _), code in found.items()}

    async def _replayed_result(self, data: Mapping[str, Any]) -> EnrollResult:
        result = _result_from_json(data)
        codes = await self._with_codes([result])
        return dc_replace(result, activation_code=codes.get(result.device_id))

    async def _replayed_batch(self, data: Mapping[str, Any]) -> BatchResult:
        batch = _batch_from_json(data)
        codes = await self._with_codes([item.result for item in batch.items if item.result is not None])
        items = tuple(
            dc_replace(item, result=dc_replace(item.result, activation_code=codes.get(item.device_id)))
            if item.result is not None
            else item
            for item in batch.items
        )
        return dc_replace(batch, items=items)

    async def rotate_code(self, raw_device_id: str, request_id: str = "") -> RotateResult:
        """A new code for an enrolled device (its code is lost, its label damaged): the new hash replaces
        the old one in the enrollment (etag-guarded; owner, metadata and certificate kept), so the old code
        stops working at once.  Audited (enrollment audit, ``rotate-code``) with the caller."""
        check_request_id(request_id)
        device_id = normalise_device_id(raw_device_id)

        async def replay(data: Mapping[str, Any]) -> RotateResult:
            cid = str(data["code_id"])
            return RotateResult(device_id, await self._codes.find(device_id, cid), cid, replayed=True)

        return await self._once(
            request_id,
            fingerprint(["rotate-code", device_id]),
            lambda: self._rotate(device_id, request_id),
            lambda result: {"device_id": device_id, "code_id": result.code_id},
            replay,
        )

    async def _rotate(self, device_id: str, request_id: str) -> RotateResult:
        with bind_device_id(device_id):
            pending = await self._outbox.latest_for(device_id)
            if pending is not None and pending.state is OutboxState.PENDING:
                raise FailedPrecondition(
                    "ENROLLMENT_PENDING",
                    f"the enrollment of {device_id} still waits in the outbox; rotate after delivery",
                )
            fresh: NewCode | None = None
            for _ in range(_MAX_ATTEMPTS):
                try:
                    existing = await self._dps.get(device_id)
                except CloudUnavailable as exc:
                    raise Unavailable(
                        "DPS_UNAVAILABLE", f"DPS cannot be reached: {exc}", retry_after=exc.retry_after or 5.0
                    ) from exc
                if existing is None:
                    raise NotFound("ENROLLMENT_NOT_FOUND", f"{device_id} has no enrollment")
                fresh = fresh or await self._new_code(device_id)
                try:
                    await self._dps.update(dc_replace(existing, code_hash=fresh[1]))
                except (CloudEtagMismatch, CloudNotFound):
                    continue
                except CloudUnavailable as exc:
                    raise Unavailable(
                        "DPS_UNAVAILABLE", f"DPS cannot be reached: {exc}", retry_after=exc.retry_after or 5.0
                    ) from exc
                except CloudRejected as exc:
                    raise _refused(exc) from exc
                cid = code_id(fresh[1])
                crash_point("rotate.after_dps_write")
                await self._codes.supersede(device_id, cid)
                await self._outbox.record_audit(
                    AuditRecord(
                        self._clock(),
                        "rotate-code",
                        device_id,
                        str(current_caller()),
                        request_id,
                        f"code id {cid}",
                    )
                )
                log.info("activation code rotated", extra={"code_id": cid})
                return RotateResult(device_id, fresh[0], cid)
        raise Aborted(
            "ENROLLMENT_CONCURRENTLY_MODIFIED", f"the enrollment of {device_id} kept changing; try again"
        )

    async def acknowledge_codes(
        self, raw_device_ids: Sequence[str], request_id: str = ""
    ) -> AcknowledgeResult:
        """The MES printed these devices' labels: their retained codes are dropped (only the hashes in DPS
        remain), each audited (``acknowledge-code``).  Returns how many codes were dropped; unknown or
        already acknowledged ids count 0."""
        check_request_id(request_id)
        self._check_size("device_ids", len(raw_device_ids), "DEVICE_IDS_EMPTY", "DEVICE_IDS_TOO_MANY")
        device_ids = [normalise_device_id(d) for d in raw_device_ids]

        async def replay(data: Mapping[str, Any]) -> AcknowledgeResult:
            return AcknowledgeResult(int(data["acknowledged"]), replayed=True)

        async def work() -> AcknowledgeResult:
            gone = await self._codes.acknowledge(device_ids)
            caller, now = str(current_caller()), self._clock()
            await self._outbox.record_audits(
                [AuditRecord(now, "acknowledge-code", d, caller, request_id, f"code id {c}") for d, c in gone]
            )
            return AcknowledgeResult(len(gone))

        return await self._once(
            request_id,
            fingerprint(["acknowledge-codes", sorted(device_ids)]),
            work,
            lambda result: {"acknowledged": result.acknowledged},
            replay,
        )

    async def purge_codes(self) -> int:
        """Drop the codes retained longer than the retention window; returns how many."""
        gone = await self._codes.purge(self._clock() - self._policy.code_retention)
        if gone:
            log.info("retained activation codes purged", extra={"purged": gone})
        return gone

    # -------------------------------------------------------------------------------------- status
    async def status(self, raw_device_id: str) -> EnrollmentStatus:
        status = await self._status(raw_device_id)
        revocations, thumbprint = self._revocations, status.sha256_thumbprint
        if revocations is not None and thumbprint and await revocations.revocation_of(thumbprint) is not None:
            return dc_replace(status, state=EnrollmentState.REVOKED)
        return status

    async def _status(self, raw_device_id: str) -> EnrollmentStatus:
        device_id = normalise_device_id(raw_device_id)
        entry = await self._outbox.latest_for(device_id)
        if entry is not None and entry.state is not OutboxState.DELIVERED:
            return _status_from_entry(entry)
        try:
            enrollment = await self._dps.get(device_id)
        except CloudUnavailable as exc:
            if entry is not None:
                return _status_from_entry(entry)
            raise Unavailable(
                "DPS_UNAVAILABLE", f"DPS cannot be reached: {exc}", retry_after=exc.retry_after or 5.0
            ) from exc
        if entry is not None:
            return dc_replace(
                _status_from_entry(entry),
                provisioning_status=enrollment.provisioning_status.value if enrollment else "",
                owner=(enrollment.owner if enrollment else None) or "",
            )
        if enrollment is None:
            return EnrollmentStatus(device_id, EnrollmentState.NOT_FOUND)
        return EnrollmentStatus(
            device_id,
            EnrollmentState.LIVE,
            provisioning_status=enrollment.provisioning_status.value,
            sha256_thumbprint=enrolled_sha256(enrollment) or "",
            owner=enrollment.owner or "",
        )


def _status_from_entry(entry: OutboxEntry) -> EnrollmentStatus:
    state = {
        OutboxState.PENDING: EnrollmentState.PENDING,
        OutboxState.DELIVERED: EnrollmentState.DELIVERED,
        OutboxState.FAILED: EnrollmentState.FAILED,
    }[entry.state]
    return EnrollmentStatus(
        entry.device_id,
        state,
        queued_at=entry.queued_at,
        delivered_at=entry.delivered_at,
        attempts=entry.attempts,
        failure_reason=entry.failure_reason,
        failure_message=entry.failure_message,
        sha256_thumbprint=entry.sha256_thumbprint,
        owner=entry.intent.owner,
    )


def _error_item(index: int, device_id: str, exc: DomainError) -> BatchItemResult:
    return BatchItemResult(index, device_id, None, ItemError(exc.kind, exc.reason, exc.message))


def _batch_json(batch: BatchResult) -> dict[str, Any]:
    return {
        "items": [
            {
                "index": item.index,
                "device_id": item.device_id,
                "result": _result_json(item.result) if item.result else None,
                "error": (
                    [item.error.kind.value, item.error.reason, item.error.message] if item.error else None
                ),
            }
            for item in batch.items
        ]
    }


def _hash_job(count: int, log2_n: int) -> list[NewCode]:
    return new_codes(count, log2_n=log2_n)


def _batch_from_json(data: Mapping[str, Any]) -> BatchResult:
    items = []
    for item in data["items"]:
        error = None
        if item["error"]:
            kind, reason, message = item["error"]
            error = ItemError(ErrorKind(kind), reason, message)
        result = _result_from_json(item["result"]) if item["result"] else None
        items.append(BatchItemResult(item["index"], item["device_id"], result, error))
    return BatchResult(tuple(items), replayed=True)
