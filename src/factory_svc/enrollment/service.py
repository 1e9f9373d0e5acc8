"""Enroll and GetEnrollmentStatus: the enrollment domain (no gRPC, no Azure SDK), and the door to the rest.

``EnrollmentService`` answers Enroll (one device: lint, revocation check, then ``writer``: DPS now, or the
outbox while DPS is unreachable or older entries still wait, to keep the order) and GetEnrollmentStatus; it
holds the enrollment's other services, built on the same DPS port, outbox and codes: ``batch``
(EnrollBatch), ``codes`` (RotateActivationCode, AcknowledgeActivationCodes, the retention purge) and
``ownership`` (TransferOwnership).  Request ids go through ``provkit.idempotency`` (``requests``: answers kept
in the outbox's database; replicas reserve an id there before the work).  The services own their worker
threads (code hashing, batch lint): ``close()`` shuts them down.

The status of an enrollment holding a certificate the factory revoked is REVOKED.  The status also says where
the device stands in the cloud: its DPS registration (read with the enrollment) and, when the factory holds
the assigned hub's credentials (``hubs``), the hub registry's last activity and connection state.

Reasons raised: Enroll's (see ``writer``), REQUEST_ID_INVALID, REQUEST_ID_REUSED; status: DPS_UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace as dc_replace
from typing import Any

from factory_svc.enrollment.batch import BatchEnrollment
from factory_svc.enrollment.codes import CodeIssuer, CodeService
from factory_svc.enrollment.lint import LintPolicy
from factory_svc.enrollment.model import (
    EnrollmentState,
    EnrollmentStatus,
    EnrollPolicy,
    EnrollRequest,
    EnrollResult,
)
from factory_svc.enrollment.outbox import Outbox, OutboxEntry, OutboxState
from factory_svc.enrollment.ownership import OwnershipService
from factory_svc.enrollment.records import RevocationCheck, enrolled_sha256
from factory_svc.enrollment.requests import OnceAnswered
from factory_svc.enrollment.retained import RetainedCodes
from factory_svc.enrollment.writer import EnrollmentWriter, enroll_fingerprint, result_from_json, result_json
from provkit.clock import Clock
from provkit.cloud import CloudError, CloudUnavailable, Enrollment, EnrollmentPort, HubTwinPort
from provkit.cloud_errors import CloudService, cloud_unavailable
from provkit.device_id import normalise_device_id
from provkit.idempotency import RequestIds, check_request_id


class EnrollmentService:
    def __init__(
        self,
        dps: EnrollmentPort,
        outbox: Outbox,
        codes: RetainedCodes,
        lint_policy: LintPolicy,
        policy: EnrollPolicy,
        clock: Clock,
        revocations: RevocationCheck | None = None,
        request_ids: RequestIds | None = None,
        hubs: HubTwinPort | None = None,
    ) -> None:
        self._revocations = revocations
        self._hubs = hubs
        self._dps = dps
        self._outbox = outbox
        # one for every RPC here (their ids share one answer table): reservations in the outbox's database
        self._answers = OnceAnswered(outbox, request_ids)
        self._issuer = CodeIssuer(codes, policy.code_hash_log2_n, clock, policy.code_hash)
        self._writer = EnrollmentWriter(dps, outbox, self._issuer, lint_policy, clock, revocations)
        self.batch = BatchEnrollment(
            dps, outbox, self._writer, self._issuer, policy, self._answers
        )  # EnrollBatch
        self.codes = CodeService(
            dps, outbox, self._issuer, policy, clock, self._answers
        )  # rotate, acknowledge
        self.ownership = OwnershipService(dps, outbox, clock, self._answers.request_ids)  # TransferOwnership

    def close(self) -> None:
        """Stop the worker threads (after the last request)."""
        self._issuer.close()
        self.batch.close()

    async def enroll(self, request: EnrollRequest) -> EnrollResult:
        check_request_id(request.request_id)
        linted = self._writer.inspect(request)
        look = await self._writer.looked_up([linted])
        if linted.sha256_thumbprint not in look.vouched:
            self._writer.verify(linted)
        if linted.sha256_thumbprint in look.revoked:
            await self._writer.refuse_revoked(linted)
        return await self._answers.run(
            request.request_id,
            enroll_fingerprint([request]),
            lambda: self._writer.enroll_linted(linted, request),
            result_json,
            self._replayed,
        )

    async def _replayed(self, data: Mapping[str, Any]) -> EnrollResult:
        return await self._issuer.replayed(result_from_json(data))

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
            raise cloud_unavailable(exc, CloudService.DPS) from exc
        if entry is not None:
            status = dc_replace(
                _status_from_entry(entry),
                provisioning_status=enrollment.provisioning_status.value if enrollment else "",
                owner=(enrollment.owner if enrollment else None) or "",
            )
        elif enrollment is None:
            return EnrollmentStatus(device_id, EnrollmentState.NOT_FOUND)
        else:
            status = EnrollmentStatus(
                device_id,
                EnrollmentState.LIVE,
                provisioning_status=enrollment.provisioning_status.value,
                sha256_thumbprint=enrolled_sha256(enrollment) or "",
                owner=enrollment.owner or "",
            )
        return await self._in_the_cloud(status, enrollment) if enrollment is not None else status

    async def _in_the_cloud(self, status: EnrollmentStatus, enrollment: Enrollment) -> EnrollmentStatus:
        """The device's registration and, when its hub is reachable with the factory's credentials, its
        last activity there (a hub the factory cannot ask leaves those fields empty)."""
        registration = enrollment.registration_state
        if registration is None:
            return status
        status = dc_replace(
            status,
            registration_status=registration.status,
            assigned_hub=registration.assigned_hub or "",
            registration_updated=registration.last_updated,
        )
        if self._hubs is None or not registration.assigned:
            return status
        assert registration.assigned_hub is not None  # registration.assigned says so
        try:
            device = await self._hubs.get_device(
                registration.assigned_hub, registration.device_id or status.device_id
            )
        except CloudError:  # not configured here, or unreachable: the status says what DPS knows
            return status
        if device is None:
            return status
        return dc_replace(
            status, last_activity=device.last_activity, connection_state=device.connection_state
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
