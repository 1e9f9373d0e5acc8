"""EnrollBatch: many devices in one call, each item answered on its own (no business rules of its own beyond
the batch's: its size, duplicates within it; each item follows Enroll's, ``writer``).

Items are linted in the event loop but for their signatures, and their certificates looked up in the ledger
together (revoked? issued by the factory under a current issuing CA?): only the signatures of certificates the
ledger does not vouch for are checked, in worker threads a bulk's worth at a time.  New ones go to DPS in bulk
operations of ten (at most ``bulk_concurrency`` at a time, all their codes made and retained first, in one
commit), replacements one by one; everything goes to the outbox while older entries wait there.  An id DPS
already holds is retried on the single-record path.  After the bulk writes the certificates revoked meanwhile
are enforced and refused (one look for the call).

Reasons raised: each item's (see ``writer``), DUPLICATE_IN_BATCH; for the call: BATCH_EMPTY, BATCH_TOO_LARGE,
REQUEST_ID_INVALID, REQUEST_ID_REUSED.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any

from factory_svc.enrollment.codes import WORKER_THREADS, CodeIssuer, NewCode
from factory_svc.enrollment.lint import LintedCertificate
from factory_svc.enrollment.model import (
    BatchItemResult,
    BatchResult,
    Delivery,
    EnrollOutcome,
    EnrollPolicy,
    EnrollRequest,
    ItemError,
)
from factory_svc.enrollment.outbox import Outbox
from factory_svc.enrollment.records import new_enrollment, revoked_error
from factory_svc.enrollment.requests import OnceAnswered, check_count
from factory_svc.enrollment.writer import (
    BatchItem,
    EnrollmentWriter,
    enroll_fingerprint,
    item_result,
    result_from_json,
    result_json,
)
from factory_svc.errors import Reason
from provkit.cloud import CloudAlreadyExists, CloudRejected, CloudUnavailable, EnrollmentPort
from provkit.cloud_errors import CloudService, cloud_refused
from provkit.context import bind_device_id
from provkit.errors import DomainError, ErrorKind
from provkit.faults import crash_point
from provkit.idempotency import check_request_id

BULK = 10  # records in one DPS bulk operation


class BatchEnrollment:
    def __init__(
        self,
        dps: EnrollmentPort,
        outbox: Outbox,
        writer: EnrollmentWriter,
        issuer: CodeIssuer,
        policy: EnrollPolicy,
        answers: OnceAnswered,
    ) -> None:
        self._dps = dps
        self._outbox = outbox
        self._writer = writer
        self._issuer = issuer
        self._policy = policy
        self._answers = answers
        self._linters = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="enroll-lint")

    def close(self) -> None:
        """Stop the lint threads (after the last request)."""
        self._linters.shutdown(wait=True)

    async def enroll(self, requests: Sequence[EnrollRequest], request_id: str = "") -> BatchResult:
        check_request_id(request_id)
        check_count(
            "items", len(requests), self._policy.max_batch, Reason.BATCH_EMPTY, Reason.BATCH_TOO_LARGE
        )
        request_fingerprint = enroll_fingerprint(requests) if request_id else ""  # only an id needs one
        requests = [  # the batch's, for the audit
            r if r.request_id == request_id else dc_replace(r, request_id=request_id) for r in requests
        ]
        return await self._answers.run(
            request_id,
            request_fingerprint,
            lambda: self._enroll_batch(requests),
            _batch_json,
            self._replayed_batch,
        )

    async def _enroll_batch(self, requests: Sequence[EnrollRequest]) -> BatchResult:
        results: list[BatchItemResult] = []
        valid: list[BatchItem] = []
        seen: set[str] = set()
        outcomes, revoked = await self._lint_many(requests)
        for index, (request, linted) in enumerate(zip(requests, outcomes, strict=True)):
            if not isinstance(linted, DomainError) and linted.sha256_thumbprint in revoked:
                try:  # the refusal with the revocation's details
                    await self._writer.refuse_revoked(linted, f"items[{index}].")
                except DomainError as exc:
                    linted = exc
            if isinstance(linted, DomainError):
                results.append(_error_item(index, request.device_id, linted))
            elif linted.device_id in seen:
                duplicate = ItemError(
                    ErrorKind.INVALID_ARGUMENT,
                    Reason.DUPLICATE_IN_BATCH,
                    "this device id appears earlier in the batch",
                )
                results.append(BatchItemResult(index, linted.device_id, None, duplicate))
            else:
                seen.add(linted.device_id)
                valid.append(BatchItem(index, linted, request))
        results.extend(await self._enroll_many(valid))
        return BatchResult(tuple(sorted(results, key=lambda r: r.index)))

    async def _lint_many(
        self, requests: Sequence[EnrollRequest]
    ) -> tuple[list[LintedCertificate | DomainError], frozenset[str]]:
        """Each item linted (or its lint error), and the thumbprints of those the factory revoked.  The
        checks but the signature run here (cheap); one ledger look for all the items says which the factory
        issued under a current issuing CA; only the others have their signatures checked, in worker threads
        a bulk's worth at a time (the check releases the GIL, so it runs beside the event loop)."""
        outcomes: list[LintedCertificate | DomainError] = []
        for index, request in enumerate(requests):
            try:
                outcomes.append(self._writer.inspect(request, f"items[{index}]."))
            except DomainError as exc:
                outcomes.append(exc)
        look = await self._writer.looked_up([o for o in outcomes if not isinstance(o, DomainError)])
        unproven = [
            (index, linted)
            for index, linted in enumerate(outcomes)
            if not isinstance(linted, DomainError) and linted.sha256_thumbprint not in look.vouched
        ]
        if unproven:
            loop = asyncio.get_running_loop()
            parts = await asyncio.gather(
                *(
                    loop.run_in_executor(self._linters, self._verify_part, unproven[n : n + BULK])
                    for n in range(0, len(unproven), BULK)
                )
            )
            for index, refusal in (failed for part in parts for failed in part):
                outcomes[index] = refusal
        return outcomes, look.revoked

    def _verify_part(self, part: Sequence[tuple[int, LintedCertificate]]) -> list[tuple[int, DomainError]]:
        """The signature checks of some items: those that fail, with their errors."""
        failed = []
        for index, linted in part:
            try:
                self._writer.verify(linted, f"items[{index}].")
            except DomainError as exc:
                failed.append((index, exc))
        return failed

    async def _enroll_many(self, valid: Sequence[BatchItem]) -> list[BatchItemResult]:
        """The linted items: new ones in bulk operations of ten (at most ``bulk_concurrency`` at a time),
        replacements one by one; everything to the outbox while older entries wait there."""
        if not valid:
            return []
        if await self._outbox.pending_count() > 0:
            codes = await self._issuer.new_codes([item.linted.device_id for item in valid])
            queued = await self._writer.queue_many(
                [(item.linted, item.request, code) for item, code in zip(valid, codes, strict=True)]
            )
            return [item_result(item, result) for item, result in zip(valid, queued, strict=True)]
        creates = [item for item in valid if not item.request.replace]
        replaces = [item for item in valid if item.request.replace]
        gate = asyncio.Semaphore(self._policy.bulk_concurrency)
        # every new item's code made and retained first (one commit), then the bulks go to DPS together
        codes = await self._issuer.new_codes([item.linted.device_id for item in creates]) if creates else []
        bulks = await asyncio.gather(
            *(
                self._create_bulk(creates[n : n + BULK], codes[n : n + BULK], gate)
                for n in range(0, len(creates), BULK)
            )
        )
        results = await self._not_revoked_since([result for bulk in bulks for result in bulk])
        codes = await self._issuer.new_codes([item.linted.device_id for item in replaces]) if replaces else []
        for item, code in zip(replaces, codes, strict=True):
            results.append(await self._enroll_item(item, code))
        return results

    async def _not_revoked_since(self, results: list[_Written | BatchItemResult]) -> list[BatchItemResult]:
        """After the bulk writes (one look for all the items they wrote): the certificates revoked
        meanwhile have their revocation enforced again and are answered CERTIFICATE_REVOKED."""
        written = [r.item for r in results if isinstance(r, _Written)]
        revoked = await self._writer.revoked_among([item.linted for item in written])
        out = []
        for result in results:
            if not isinstance(result, _Written):
                out.append(result)
            elif result.item.linted.sha256_thumbprint in revoked:
                item = result.item
                refusal = revoked_error(item.linted.sha256_thumbprint, None, f"items[{item.index}].")
                out.append(_error_item(item.index, item.linted.device_id, refusal))
            else:
                out.append(result.result)
        return out

    async def _create_bulk(
        self, part: Sequence[BatchItem], codes: Sequence[NewCode], gate: asyncio.Semaphore
    ) -> list[_Written | BatchItemResult]:
        """One DPS bulk create for up to ten new items with their (retained) codes; an id DPS already holds
        is retried on the single-record path (it may hold this very certificate).  The items it wrote are
        answered ``_Written``: the check for revocations after the write is the batch's
        (``_not_revoked_since``)."""
        records = [
            new_enrollment(item.linted, record, item.request.owner)
            for item, (_, record) in zip(part, codes, strict=True)
        ]
        async with gate:
            try:
                errors = await self._dps.bulk_create(records)
            except CloudUnavailable:
                queued = await self._writer.queue_many(
                    [(item.linted, item.request, code) for item, code in zip(part, codes, strict=True)]
                )
                return [item_result(item, result) for item, result in zip(part, queued, strict=True)]
            except CloudRejected as exc:
                refused = cloud_refused(exc, CloudService.DPS, what="the enrollment", with_status=True)
                return [_error_item(item.index, item.linted.device_id, refused) for item in part]
        crash_point("enroll.after_dps_write")
        failed = {e.registration_id.lower(): e.error for e in errors}
        results: list[_Written | BatchItemResult] = []
        for item, code in zip(part, codes, strict=True):
            error = failed.get(item.linted.device_id)
            if error is None:
                created = self._writer.result(item.linted, EnrollOutcome.CREATED, Delivery.LIVE, code)
                results.append(_Written(item, item_result(item, created)))
            elif isinstance(error, CloudAlreadyExists):
                results.append(await self._enroll_item(item, code))
            else:
                refused = cloud_refused(error, CloudService.DPS, what="the enrollment", with_status=True)
                results.append(_error_item(item.index, item.linted.device_id, refused))
        return results

    async def _enroll_item(self, item: BatchItem, code: NewCode) -> BatchItemResult:
        """One batch item on the single-record path (live, else queued), or its error."""
        with bind_device_id(item.linted.device_id):
            try:
                try:
                    result = await self._writer.live(item.linted, item.request, code)
                except CloudUnavailable:
                    result = (await self._writer.queue_many([(item.linted, item.request, code)]))[0]
            except DomainError as exc:
                return _error_item(item.index, item.linted.device_id, exc)
        return item_result(item, result)

    async def _replayed_batch(self, data: Mapping[str, Any]) -> BatchResult:
        batch = _batch_from_json(data)
        codes = await self._issuer.with_codes(
            [item.result for item in batch.items if item.result is not None]
        )
        items = tuple(
            dc_replace(item, result=dc_replace(item.result, activation_code=codes.get(item.device_id)))
            if item.result is not None
            else item
            for item in batch.items
        )
        return dc_replace(batch, items=items)


@dataclass(frozen=True)
class _Written:
    """A batch item a bulk create wrote, and its answer unless it was revoked meanwhile."""

    item: BatchItem
    result: BatchItemResult


def _error_item(index: int, device_id: str, exc: DomainError) -> BatchItemResult:
    return BatchItemResult(index, device_id, None, ItemError(exc.kind, exc.reason, exc.message))


def _batch_json(batch: BatchResult) -> dict[str, Any]:
    return {
        "items": [
            {
                "index": item.index,
                "device_id": item.device_id,
                "result": result_json(item.result) if item.result else None,
                "error": (
                    [item.error.kind.value, item.error.reason, item.error.message] if item.error else None
                ),
            }
            for item in batch.items
        ]
    }


def _batch_from_json(data: Mapping[str, Any]) -> BatchResult:
    items = []
    for item in data["items"]:
        error = None
        if item["error"]:
            kind, reason, message = item["error"]
            error = ItemError(ErrorKind(kind), reason, message)
        result = result_from_json(item["result"]) if item["result"] else None
        items.append(BatchItemResult(item["index"], item["device_id"], result, error))
    return BatchResult(tuple(items), replayed=True)
