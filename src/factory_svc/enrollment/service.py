"""Enroll, EnrollBatch and GetEnrollmentStatus: the enrollment domain (no gRPC, no Azure SDK).

- ``EnrollmentService`` creates DPS individual enrollments (X.509, registrationId = deviceId = the id,
  provisioning status *disabled*) through an ``EnrollmentPort``, after the preflight lint.
- When DPS is unreachable (``CloudUnavailable``) -- or while older entries still wait, to keep the order --
  the enrollment goes to the ``Outbox`` and ``OutboxDelivery`` delivers it later.

Reasons raised: the lint reasons (``lint.py``), ENROLLMENT_EXISTS (another certificate, no ``replace``),
ENROLLMENT_CONCURRENTLY_MODIFIED, DPS_REFUSED, DPS_UNAVAILABLE, BATCH_EMPTY, BATCH_TOO_LARGE,
DUPLICATE_IN_BATCH, REQUEST_ID_REUSED.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace as dc_replace
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from factory_svc.device_id import normalise_device_id
from factory_svc.enrollment.lint import LintedCertificate, LintPolicy, lint_certificate
from factory_svc.enrollment.model import (
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
)
from factory_svc.enrollment.outbox import NewEntry, Outbox, OutboxEntry, OutboxState
from provkit.activation_code import CODE_RECORD_KEY, new_codes
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
from provkit.errors import (
    AlreadyExists,
    Conflict,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    invalid_field,
)

log = logging.getLogger("factory_svc.enrollment")

Clock = Callable[[], datetime]
_MAX_ATTEMPTS = 8
_BULK = 10
# Worker threads shared by every request: activation codes are hashed in one pool, batch items linted in
# another.  scrypt and the ECDSA check release the GIL, but each must take it back afterwards, and while
# another thread runs Python that waits up to the interpreter's switch interval (5 ms): one hashing thread
# then manages ~230 hashes/s whatever the cores.  So: several threads, small jobs.  (Measured beside a busy
# Python thread: 1 hashing thread 229/s, 2: 475/s, 4 and 8: ~775/s, which was all the CPU left.)
_WORKER_THREADS = max(4, min(16, 4 * (os.cpu_count() or 2)))
_HASH_JOB = 5
_HASHERS = ThreadPoolExecutor(max_workers=_WORKER_THREADS, thread_name_prefix="code-hash")
_LINTERS = ThreadPoolExecutor(max_workers=_WORKER_THREADS, thread_name_prefix="enroll-lint")


# ------------------------------------------------------------------------------------- enrollment bodies
def new_enrollment_body(linted: LintedCertificate, code_record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "registrationId": linted.device_id,
        "deviceId": linted.device_id,
        "provisioningStatus": "disabled",
        "attestation": {
            "type": "x509",
            "x509": {"clientCertificates": {"primary": {"certificate": linted.leaf_pem}}},
        },
        "capabilities": {"iotEdge": False},
        "optionalDeviceInformation": {CODE_RECORD_KEY: dict(code_record)},
    }


def replaced_enrollment_body(
    existing: Enrollment, linted: LintedCertificate, code_record: Mapping[str, Any]
) -> dict[str, Any]:
    body = existing.body()
    for read_only in ("registrationState", "createdDateTimeUtc", "lastUpdatedDateTimeUtc"):
        body.pop(read_only, None)
    body["attestation"] = {
        "type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": linted.leaf_pem}}},
    }
    info = dict(body.get("optionalDeviceInformation") or {})
    info[CODE_RECORD_KEY] = dict(code_record)
    body["optionalDeviceInformation"] = info
    return body


def enrolled_sha256(enrollment: Enrollment) -> str | None:
    """The SHA-256 thumbprint of the certificate an enrollment holds (from the PEM, else DPS's info)."""
    pem = enrollment.certificate
    if pem:
        try:
            text = pem if "BEGIN CERTIFICATE" in pem else None
            if text is not None:
                cert = x509.load_pem_x509_certificate(text.encode())
                return cert.fingerprint(hashes.SHA256()).hex().upper()
        except ValueError:
            pass
    thumb = enrollment.certificate_info.get("sha256Thumbprint")
    return str(thumb).upper() if thumb else None


def _code_record(enrollment: Enrollment) -> Any:
    return enrollment.optional_device_information.get(CODE_RECORD_KEY)


def _fingerprint(items: Sequence[EnrollRequest]) -> str:
    canonical = json.dumps(
        [[i.device_id.strip().lower(), i.certificate_pem.strip(), i.replace] for i in items], sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _result_json(result: EnrollResult) -> dict[str, Any]:
    return {
        "device_id": result.device_id,
        "outcome": result.outcome.value,
        "delivery": result.delivery.value,
        "sha1": result.sha1_thumbprint,
        "sha256": result.sha256_thumbprint,
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
    )


def _refused(exc: CloudRejected) -> DomainError:
    return FailedPrecondition(
        "DPS_REFUSED", f"DPS refused the enrollment: {exc}", metadata={"status": str(exc.status)}
    )


# ------------------------------------------------------------------------------------------------ service
class EnrollmentService:
    def __init__(
        self,
        dps: EnrollmentPort,
        outbox: Outbox,
        lint_policy: LintPolicy,
        policy: EnrollPolicy,
        clock: Clock,
    ) -> None:
        self._dps = dps
        self._outbox = outbox
        self._lint = lint_policy
        self._policy = policy
        self._clock = clock

    # ------------------------------------------------------------------------------------- helpers
    async def _new_code(self) -> tuple[str, dict[str, Any]]:
        return (await self._new_codes(1))[0]

    async def _new_codes(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        """``count`` codes, hashed in the hashing threads, a few codes per job."""
        log2_n = self._policy.code_hash_log2_n

        def make(n: int) -> list[tuple[str, dict[str, Any]]]:
            return new_codes(n, log2_n=log2_n)

        loop = asyncio.get_running_loop()
        jobs = [min(_HASH_JOB, count - k) for k in range(0, count, _HASH_JOB)]
        parts = await asyncio.gather(*(loop.run_in_executor(_HASHERS, make, n) for n in jobs))
        return [item for part in parts for item in part]

    def lint(self, request: EnrollRequest, field_prefix: str = "") -> LintedCertificate:
        return lint_certificate(
            request.device_id, request.certificate_pem, self._lint, self._clock(), field_prefix
        )

    def _result(
        self, linted: LintedCertificate, outcome: EnrollOutcome, delivery: Delivery, code: str | None
    ) -> EnrollResult:
        return EnrollResult(
            linted.device_id, outcome, delivery, code, linted.sha1_thumbprint, linted.sha256_thumbprint
        )

    async def _queue_many(
        self, items: Sequence[tuple[LintedCertificate, bool, str, dict[str, Any]]]
    ) -> list[EnrollResult]:
        entries = [
            NewEntry(
                linted.device_id,
                "replace" if replace else "create",
                new_enrollment_body(linted, record),
                linted.sha256_thumbprint,
            )
            for linted, replace, _code, record in items
        ]
        await self._outbox.enqueue(entries, self._clock())
        for linted, *_ in items:
            log.info("enrollment queued (DPS unreachable)", extra={"enrolled_device": linted.device_id})
        return [
            self._result(linted, EnrollOutcome.QUEUED, Delivery.QUEUED, code) for linted, _, code, _ in items
        ]

    # ---------------------------------------------------------------------------------- live path
    async def _live(
        self, linted: LintedCertificate, replace: bool, fresh: tuple[str, dict[str, Any]] | None
    ) -> EnrollResult:
        """Create or (with ``replace``) update the enrollment now.  Raises CloudUnavailable."""
        for _ in range(_MAX_ATTEMPTS):
            existing = await self._dps.get(linted.device_id)
            if existing is None:
                code, record = fresh or await self._new_code()
                fresh = (code, record)
                try:
                    await self._dps.create(new_enrollment_body(linted, record))
                except CloudAlreadyExists:
                    continue
                except CloudRejected as exc:
                    raise _refused(exc) from exc
                log.info("enrolled (disabled)", extra={"sha256": linted.sha256_thumbprint})
                return self._result(linted, EnrollOutcome.CREATED, Delivery.LIVE, code)
            same = enrolled_sha256(existing) == linted.sha256_thumbprint
            if not replace:
                if same:
                    return self._result(linted, EnrollOutcome.UNCHANGED, Delivery.LIVE, None)
                raise AlreadyExists(
                    "ENROLLMENT_EXISTS",
                    f"{linted.device_id} is enrolled with another certificate; set replace to rework it",
                    metadata={"enrolled_sha256": enrolled_sha256(existing) or ""},
                )
            code, record = fresh or await self._new_code()
            fresh = (code, record)
            try:
                await self._dps.update(
                    replaced_enrollment_body(existing, linted, record), existing.etag or "*"
                )
            except (CloudEtagMismatch, CloudNotFound):
                continue
            except CloudRejected as exc:
                raise _refused(exc) from exc
            log.info("enrollment replaced", extra={"sha256": linted.sha256_thumbprint})
            return self._result(linted, EnrollOutcome.REPLACED, Delivery.LIVE, code)
        raise Conflict(
            "ENROLLMENT_CONCURRENTLY_MODIFIED",
            f"the enrollment of {linted.device_id} kept changing; try again",
        )

    async def _enroll_linted(self, linted: LintedCertificate, replace: bool) -> EnrollResult:
        with bind_device_id(linted.device_id):
            if await self._outbox.pending_count() == 0:
                try:
                    return await self._live(linted, replace, None)
                except CloudUnavailable:
                    pass
            code, record = await self._new_code()
            return (await self._queue_many([(linted, replace, code, record)]))[0]

    # ------------------------------------------------------------------------------------ requests
    async def _replay(self, request_id: str, fingerprint: str) -> dict[str, Any] | None:
        found = await self._outbox.find_request(request_id)
        if found is None:
            return None
        if found[0] != fingerprint:
            raise InvalidArgument(
                "REQUEST_ID_REUSED",
                "this request_id was used for a different request",
                metadata={"request_id": request_id},
            )
        return found[1]

    async def enroll(self, request: EnrollRequest) -> EnrollResult:
        linted = self.lint(request)
        fingerprint = _fingerprint([request])
        if request.request_id:
            earlier = await self._replay(request.request_id, fingerprint)
            if earlier is not None:
                return _result_from_json(earlier)
        result = await self._enroll_linted(linted, request.replace)
        if request.request_id:
            await self._outbox.remember_request(request.request_id, fingerprint, _result_json(result))
        return result

    async def enroll_batch(self, requests: Sequence[EnrollRequest], request_id: str = "") -> BatchResult:
        if not requests:
            raise invalid_field("items", "BATCH_EMPTY", "the batch has no items")
        if len(requests) > self._policy.max_batch:
            raise invalid_field(
                "items",
                "BATCH_TOO_LARGE",
                f"at most {self._policy.max_batch} items per batch (got {len(requests)})",
            )
        fingerprint = _fingerprint(requests)
        if request_id:
            earlier = await self._replay(request_id, fingerprint)
            if earlier is not None:
                return _batch_from_json(earlier)
        results: list[BatchItemResult | None] = [None] * len(requests)
        valid: list[tuple[int, LintedCertificate, bool]] = []
        seen: set[str] = set()
        outcomes = await self._lint_many(requests)
        for index, (request, linted) in enumerate(zip(requests, outcomes, strict=True)):
            if isinstance(linted, DomainError):
                results[index] = _error_item(index, request.device_id, linted)
                continue
            if linted.device_id in seen:
                results[index] = BatchItemResult(
                    index,
                    linted.device_id,
                    None,
                    ItemError(
                        "invalid_argument",
                        "DUPLICATE_IN_BATCH",
                        "this device id appears earlier in the batch",
                    ),
                )
                continue
            seen.add(linted.device_id)
            valid.append((index, linted, request.replace))
        for index, result in await self._enroll_many(valid):
            results[index] = result
        batch = BatchResult(tuple(r for r in results if r is not None))
        if request_id:
            await self._outbox.remember_request(request_id, fingerprint, _batch_json(batch))
        return batch

    async def _lint_many(self, requests: Sequence[EnrollRequest]) -> list[LintedCertificate | DomainError]:
        """Each item linted (or its lint error), in worker threads a bulk's worth at a time: the signature
        check releases the GIL, so it runs beside the event loop instead of in it."""

        def job(start: int, part: Sequence[EnrollRequest]) -> list[LintedCertificate | DomainError]:
            out: list[LintedCertificate | DomainError] = []
            for offset, request in enumerate(part):
                try:
                    out.append(self.lint(request, f"items[{start + offset}]."))
                except DomainError as exc:
                    out.append(exc)
            return out

        loop = asyncio.get_running_loop()
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(_LINTERS, job, start, requests[start : start + _BULK])
                for start in range(0, len(requests), _BULK)
            )
        )
        return [item for part in parts for item in part]

    async def _enroll_many(
        self, valid: Sequence[tuple[int, LintedCertificate, bool]]
    ) -> list[tuple[int, BatchItemResult]]:
        out: list[tuple[int, BatchItemResult]] = []
        if not valid:
            return out
        if await self._outbox.pending_count() > 0:
            codes = await self._new_codes(len(valid))
            items = [(lin, rep, *code) for (_, lin, rep), code in zip(valid, codes, strict=True)]
            queued = await self._queue_many(items)
            return [
                (i, BatchItemResult(i, lin.device_id, res, None))
                for (i, lin, _), res in zip(valid, queued, strict=True)
            ]
        # Codes are hashed per bulk operation, so the first operation goes out after ten hashes rather than
        # after the whole batch, and hashing (worker threads) overlaps with writing to DPS (event loop).
        fresh: dict[int, tuple[str, dict[str, Any]]] = {}

        async def hashed(indexes: Sequence[int]) -> None:
            fresh.update(zip(indexes, await self._new_codes(len(indexes)), strict=True))
        creates = [(i, lin) for i, lin, rep in valid if not rep]
        replaces = [(i, lin) for i, lin, rep in valid if rep]
        gate = asyncio.Semaphore(self._policy.bulk_concurrency)

        async def one(index: int, linted: LintedCertificate, replace: bool) -> None:
            try:
                with bind_device_id(linted.device_id):
                    try:
                        result = await self._live(linted, replace, fresh[index])
                    except CloudUnavailable:
                        result = (await self._queue_many([(linted, replace, *fresh[index])]))[0]
                out.append((index, BatchItemResult(index, linted.device_id, result, None)))
            except DomainError as exc:
                out.append((index, _error_item(index, linted.device_id, exc)))

        async def chunk(part: Sequence[tuple[int, LintedCertificate]]) -> None:
            await hashed([i for i, _ in part])
            async with gate:
                bodies = [new_enrollment_body(lin, fresh[i][1]) for i, lin in part]
                try:
                    errors = await self._dps.bulk_create(bodies)
                except CloudUnavailable:
                    queued = await self._queue_many([(lin, False, *fresh[i]) for i, lin in part])
                    out.extend(
                        (i, BatchItemResult(i, lin.device_id, res, None))
                        for (i, lin), res in zip(part, queued, strict=True)
                    )
                    return
                except CloudRejected as exc:
                    for i, lin in part:
                        out.append((i, _error_item(i, lin.device_id, _refused(exc))))
                    return
                failed = {e.registration_id.lower(): e for e in errors}
                retry_one = []
                for i, lin in part:
                    error = failed.get(lin.device_id)
                    if error is None:
                        result = self._result(lin, EnrollOutcome.CREATED, Delivery.LIVE, fresh[i][0])
                        out.append((i, BatchItemResult(i, lin.device_id, result, None)))
                    elif error.error_code // 1000 == 409:
                        retry_one.append((i, lin))
                    else:
                        refused = FailedPrecondition(
                            "DPS_REFUSED",
                            f"DPS refused the enrollment: {error.error_status} ({error.error_code})",
                        )
                        out.append((i, _error_item(i, lin.device_id, refused)))
            for i, lin in retry_one:
                await one(i, lin, False)

        parts = [creates[n : n + _BULK] for n in range(0, len(creates), _BULK)]
        await asyncio.gather(*(chunk(p) for p in parts))
        if replaces:
            await hashed([i for i, _ in replaces])
        for i, lin in replaces:
            async with gate:
                await one(i, lin, True)
        return out

    # -------------------------------------------------------------------------------------- status
    async def status(self, raw_device_id: str) -> EnrollmentStatus:
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
                provisioning_status=enrollment.provisioning_status if enrollment else "",
            )
        if enrollment is None:
            return EnrollmentStatus(device_id, EnrollmentState.NOT_FOUND)
        return EnrollmentStatus(
            device_id,
            EnrollmentState.LIVE,
            provisioning_status=enrollment.provisioning_status,
            sha256_thumbprint=enrolled_sha256(enrollment) or "",
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
    )


def _error_item(index: int, device_id: str, exc: DomainError) -> BatchItemResult:
    return BatchItemResult(index, device_id, None, ItemError(exc.kind.value, exc.reason, exc.message))


def _batch_json(batch: BatchResult) -> dict[str, Any]:
    return {
        "items": [
            {
                "index": item.index,
                "device_id": item.device_id,
                "result": _result_json(item.result) if item.result else None,
                "error": [item.error.kind, item.error.reason, item.error.message] if item.error else None,
            }
            for item in batch.items
        ]
    }


def _batch_from_json(data: Mapping[str, Any]) -> BatchResult:
    items = []
    for item in data["items"]:
        error = ItemError(*item["error"]) if item["error"] else None
        result = _result_from_json(item["result"]) if item["result"] else None
        items.append(BatchItemResult(item["index"], item["device_id"], result, error))
    return BatchResult(tuple(items), replayed=True)
