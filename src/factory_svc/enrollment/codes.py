"""Activation codes: made (hashed in worker threads, retained encrypted before DPS sees the hash), rotated,
acknowledged and purged.

- ``CodeIssuer`` makes the codes every enrollment path hands out: hashed (on the event loop with the default
  HMAC-SHA-256, about a microsecond each; in its own threads when scrypt is configured), retained
  (``RetainedCodes``) before anyone can write the hash to DPS, so a retry -- same request id, or a re-run that
  finds the device UNCHANGED -- returns the code again until the MES acknowledges the label or the retention
  window passes.  ``close()`` shuts its threads down.
- ``CodeService`` is RotateActivationCode (``rotate``: a device's code hash replaced, etag-guarded, when its
  code is lost or its label damaged), AcknowledgeActivationCodes (``acknowledge``: the retained codes
  dropped) and the retention purge (``purge``).

Reasons raised: rotation: ENROLLMENT_NOT_FOUND, ENROLLMENT_PENDING, ENROLLMENT_CONCURRENTLY_MODIFIED,
DPS_REFUSED, DPS_UNAVAILABLE; acknowledgement: DEVICE_IDS_EMPTY, DEVICE_IDS_TOO_MANY; both REQUEST_ID_INVALID,
REQUEST_ID_REUSED.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace as dc_replace
from typing import Any

from factory_svc.enrollment.model import AcknowledgeResult, EnrollPolicy, EnrollResult, RotateResult
from factory_svc.enrollment.outbox import AuditRecord, Outbox, OutboxState
from factory_svc.enrollment.requests import OnceAnswered, check_count
from factory_svc.enrollment.retained import RetainedCodes, code_id
from factory_svc.errors import Reason
from provkit.activation_code import CodeHash, new_codes
from provkit.clock import Clock
from provkit.cloud import (
    CloudEtagMismatch,
    CloudNotFound,
    CloudUnavailable,
    Enrollment,
    EnrollmentPort,
)
from provkit.cloud_errors import CloudService, cloud_unavailable, translating_cloud_errors
from provkit.context import bind_device_id, current_caller
from provkit.device_id import normalise_device_id
from provkit.errors import Aborted, FailedPrecondition, NotFound
from provkit.errors import Reason as SharedReason
from provkit.faults import crash_point
from provkit.idempotency import check_request_id, fingerprint

log = logging.getLogger("factory_svc.enrollment")

NewCode = tuple[str, dict[str, Any]]  # the code handed out once, and the hash record DPS keeps
MAX_ATTEMPTS = 8  # etag-guarded updates of one enrollment before ENROLLMENT_CONCURRENTLY_MODIFIED
# Worker threads, one pool for hashing activation codes with scrypt (the fast default hash needs none) and
# one for the signature checks of batch items the ledger does not vouch for (see ``batch``).  scrypt and the
# ECDSA check release the GIL, but each must take it back afterwards, and while another thread runs Python
# that waits up to the interpreter's switch interval (5 ms): one hashing thread then manages ~230 hashes/s
# whatever the cores.  So: several threads.
# (Measured beside a busy Python thread: 1 hashing thread 229/s, 2: 475/s, 4 and 8: ~775/s, which was all
# the CPU left.)  A job is one DPS bulk operation's worth (ten codes): half the hand-overs of five per job,
# ~6 % less CPU per enrollment.
WORKER_THREADS = max(4, min(16, 4 * (os.cpu_count() or 2)))
_HASH_JOB = 10


def _hash_job(count: int, alg: CodeHash, log2_n: int) -> list[NewCode]:
    return new_codes(count, alg=alg, log2_n=log2_n)


class CodeIssuer:
    """New codes, hashed and retained; the retained code of an enrollment or a result."""

    def __init__(
        self, codes: RetainedCodes, log2_n: int, clock: Clock, alg: CodeHash = CodeHash.HMAC_SHA256
    ) -> None:
        self.retained = codes
        self._alg = alg
        self._log2_n = log2_n
        self._clock = clock
        self._hashers = (
            ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="code-hash")
            if alg is CodeHash.SCRYPT
            else None
        )

    def close(self) -> None:
        """Stop the hashing threads (after the last request)."""
        if self._hashers is not None:
            self._hashers.shutdown(wait=True)

    async def new_code(self, device_id: str) -> NewCode:
        return (await self.new_codes([device_id]))[0]

    async def new_codes(self, device_ids: Sequence[str]) -> list[NewCode]:
        """A code for each device, hashed (scrypt: in the hashing threads, ten per job), and retained
        (encrypted, committed) before anyone can write its hash to DPS."""
        count = len(device_ids)
        if self._hashers is None:  # a microsecond a code: a hand-off to a thread would cost more
            codes = _hash_job(count, self._alg, self._log2_n)
        else:
            loop = asyncio.get_running_loop()
            jobs = [min(_HASH_JOB, count - k) for k in range(0, count, _HASH_JOB)]
            parts = await asyncio.gather(
                *(loop.run_in_executor(self._hashers, _hash_job, n, self._alg, self._log2_n) for n in jobs)
            )
            codes = [item for part in parts for item in part]
        await self.retained.retain(
            [(d, code, record) for d, (code, record) in zip(device_ids, codes, strict=True)], self._clock()
        )
        return codes

    async def retained_code(self, enrollment: Enrollment) -> NewCode | None:
        """The code whose hash the enrollment holds, while it is retained."""
        record = enrollment.code_hash
        code = await self.retained.find(enrollment.registration_id, code_id(record))
        return None if code is None or record is None else (code, dict(record))

    async def with_codes(self, results: Sequence[EnrollResult]) -> dict[str, str]:
        """The retained codes of replayed results, by device id."""
        keys = [(r.device_id, r.code_id) for r in results if r.code_id]
        found = await self.retained.find_many(keys)
        return {device_id: code for (device_id, _), code in found.items()}

    async def replayed(self, result: EnrollResult) -> EnrollResult:
        """A replayed result with its code again, while it is retained."""
        codes = await self.with_codes([result])
        return dc_replace(result, activation_code=codes.get(result.device_id))


class CodeService:
    def __init__(
        self,
        dps: EnrollmentPort,
        outbox: Outbox,
        issuer: CodeIssuer,
        policy: EnrollPolicy,
        clock: Clock,
        answers: OnceAnswered,
    ) -> None:
        self._dps = dps
        self._outbox = outbox
        self._issuer = issuer
        self._codes = issuer.retained
        self._policy = policy
        self._clock = clock
        self._answers = answers

    async def rotate(self, raw_device_id: str, request_id: str = "") -> RotateResult:
        """A new code for an enrolled device (its code is lost, its label damaged): the new hash replaces
        the old one in the enrollment (etag-guarded; owner, metadata and certificate kept), so the old code
        stops working at once.  Audited (enrollment audit, ``rotate-code``) with the caller."""
        check_request_id(request_id)
        device_id = normalise_device_id(raw_device_id)

        async def replay(data: Mapping[str, Any]) -> RotateResult:
            cid = str(data["code_id"])
            return RotateResult(device_id, await self._codes.find(device_id, cid), cid, replayed=True)

        return await self._answers.run(
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
                    Reason.ENROLLMENT_PENDING,
                    f"the enrollment of {device_id} still waits in the outbox; rotate after delivery",
                )
            fresh: NewCode | None = None
            for _ in range(MAX_ATTEMPTS):
                try:
                    existing = await self._dps.get(device_id)
                except CloudUnavailable as exc:  # only unreachable: a refused read stays INTERNAL, as it was
                    raise cloud_unavailable(exc, CloudService.DPS) from exc
                if existing is None:
                    raise NotFound(Reason.ENROLLMENT_NOT_FOUND, f"{device_id} has no enrollment")
                fresh = fresh or await self._issuer.new_code(device_id)
                with translating_cloud_errors(
                    CloudService.DPS, refused="the enrollment", refused_metadata=True
                ):
                    try:
                        await self._dps.update(dc_replace(existing, code_hash=fresh[1]))
                    except (CloudEtagMismatch, CloudNotFound):
                        continue
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
            SharedReason.ENROLLMENT_CONCURRENTLY_MODIFIED,
            f"the enrollment of {device_id} kept changing; try again",
        )

    async def acknowledge(self, raw_device_ids: Sequence[str], request_id: str = "") -> AcknowledgeResult:
        """The MES printed these devices' labels: their retained codes are dropped (only the hashes in DPS
        remain), each audited (``acknowledge-code``).  Returns how many codes were dropped; unknown or
        already acknowledged ids count 0."""
        check_request_id(request_id)
        limit = self._policy.max_batch
        check_count(
            "device_ids", len(raw_device_ids), limit, Reason.DEVICE_IDS_EMPTY, Reason.DEVICE_IDS_TOO_MANY
        )
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

        return await self._answers.run(
            request_id,
            fingerprint(["acknowledge-codes", sorted(device_ids)]),
            work,
            lambda result: {"acknowledged": result.acknowledged},
            replay,
        )

    async def purge(self) -> int:
        """Drop the codes retained longer than the retention window; returns how many."""
        gone = await self._codes.purge(self._clock() - self._policy.code_retention)
        if gone:
            log.info("retained activation codes purged", extra={"purged": gone})
        return gone
