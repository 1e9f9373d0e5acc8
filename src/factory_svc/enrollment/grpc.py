"""The enrollment RPCs (Enroll, EnrollBatch, GetEnrollmentStatus, TransferOwnership, RotateActivationCode,
AcknowledgeActivationCodes): proto <-> domain conversions, no business rules.

``EnrollmentRpcs`` is one part of ``factory_svc.app.FactoryServicer``, which sets ``_enrollment`` (an
``EnrollmentService``, or None when enrollment is not configured: FAILED_PRECONDITION), ``_device_ids`` and
``_metrics``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.enrollment.model import (
    BatchItemResult,
    BatchResult,
    Delivery,
    EnrollmentState,
    EnrollmentStatus,
    EnrollOutcome,
    EnrollRequest,
    EnrollResult,
    ItemError,
    TransferCommand,
)
from factory_svc.enrollment.service import EnrollmentService
from factory_svc.errors import Reason
from provkit.context import current_caller
from provkit.device_id import DeviceIdPolicy, check_device_id
from provkit.errors import DomainError, FailedPrecondition, InvalidArgument
from provkit.grpc_server import Context
from provkit.metrics import SuiteMetrics
from provkit.proto_names import timestamp

OUTCOME_TO_PROTO = {
    EnrollOutcome.CREATED: pb.ENROLL_OUTCOME_CREATED,
    EnrollOutcome.UNCHANGED: pb.ENROLL_OUTCOME_UNCHANGED,
    EnrollOutcome.REPLACED: pb.ENROLL_OUTCOME_REPLACED,
    EnrollOutcome.QUEUED: pb.ENROLL_OUTCOME_QUEUED,
}
DELIVERY_TO_PROTO = {
    Delivery.LIVE: pb.ENROLLMENT_DELIVERY_LIVE,
    Delivery.QUEUED: pb.ENROLLMENT_DELIVERY_QUEUED,
}
STATE_TO_PROTO = {
    EnrollmentState.PENDING: pb.ENROLLMENT_STATE_PENDING,
    EnrollmentState.DELIVERED: pb.ENROLLMENT_STATE_DELIVERED,
    EnrollmentState.FAILED: pb.ENROLLMENT_STATE_FAILED,
    EnrollmentState.LIVE: pb.ENROLLMENT_STATE_LIVE,
    EnrollmentState.NOT_FOUND: pb.ENROLLMENT_STATE_NOT_FOUND,
    EnrollmentState.REVOKED: pb.ENROLLMENT_STATE_REVOKED,
}


def result_to_proto(result: EnrollResult) -> pb.EnrollResponse:
    return pb.EnrollResponse(
        device_id=result.device_id,
        outcome=OUTCOME_TO_PROTO[result.outcome],
        delivery=DELIVERY_TO_PROTO[result.delivery],
        activation_code=result.activation_code or "",
        sha1_thumbprint=result.sha1_thumbprint,
        sha256_thumbprint=result.sha256_thumbprint,
        replayed=result.replayed,
    )


def batch_to_proto(batch: BatchResult) -> pb.EnrollBatchResponse:
    results = []
    for item in batch.items:
        entry = pb.EnrollBatchResult(index=item.index, device_id=item.device_id)
        if item.result is not None:
            entry.response.CopyFrom(result_to_proto(item.result))
        if item.error is not None:
            entry.error.CopyFrom(
                pb.EnrollItemError(
                    code=item.error.kind.name,
                    reason=item.error.reason,
                    message=item.error.message,
                )
            )
        results.append(entry)
    return pb.EnrollBatchResponse(
        results=results,
        enrolled_count=batch.enrolled,
        queued_count=batch.queued,
        failed_count=batch.failed,
        replayed=batch.replayed,
    )


def status_to_proto(status: EnrollmentStatus) -> pb.GetEnrollmentStatusResponse:
    reply = pb.GetEnrollmentStatusResponse(
        device_id=status.device_id,
        state=STATE_TO_PROTO[status.state],
        attempts=status.attempts,
        failure_reason=status.failure_reason,
        failure_message=status.failure_message,
        provisioning_status=status.provisioning_status,
        sha256_thumbprint=status.sha256_thumbprint,
        owner_oem=status.owner,
        registration_status=status.registration_status,
        assigned_hub=status.assigned_hub,
        hub_connection_state=status.connection_state,
    )
    if status.registration_updated is not None:
        reply.registration_updated_time.CopyFrom(timestamp(status.registration_updated))
    if status.last_activity is not None:
        reply.last_activity_time.CopyFrom(timestamp(status.last_activity))
    if status.queued_at is not None:
        reply.queued_time.CopyFrom(timestamp(status.queued_at))
    if status.delivered_at is not None:
        reply.delivered_time.CopyFrom(timestamp(status.delivered_at))
    return reply


def count_enrollment(metrics: SuiteMetrics, result: EnrollResult) -> None:
    if result.replayed:
        metrics.enrolled("replayed")
        return
    metrics.enrolled(result.outcome.value)
    if result.outcome is EnrollOutcome.REPLACED:
        metrics.codes_rotated()  # the enrollment now holds a new code; the earlier one no longer works


class EnrollmentRpcs:
    _enrollment: EnrollmentService | None
    _device_ids: DeviceIdPolicy
    _metrics: SuiteMetrics

    def _service(self) -> EnrollmentService:
        if self._enrollment is None:
            raise FailedPrecondition(
                Reason.ENROLLMENT_NOT_CONFIGURED, "this factory service has no DPS configured"
            )
        return self._enrollment

    async def Enroll(self, request: pb.EnrollRequest, context: Context) -> pb.EnrollResponse:
        try:
            device_id = check_device_id(request.device_id, self._device_ids)
            result = await self._service().enroll(
                EnrollRequest(
                    device_id,
                    request.certificate_pem,
                    request.replace,
                    request.request_id,
                    request.owner_oem,
                    request.replace_reason,
                    current_caller(),
                )
            )
        except DomainError:
            self._metrics.enrolled("refused")
            raise
        count_enrollment(self._metrics, result)
        return result_to_proto(result)

    async def EnrollBatch(self, request: pb.EnrollBatchRequest, context: Context) -> pb.EnrollBatchResponse:
        # The id policy is checked here, item by item: a refused id fails its item, as any bad item does.
        service = self._service()
        caller = current_caller()
        refused: list[BatchItemResult] = []
        accepted: list[tuple[int, EnrollRequest]] = []
        for index, item in enumerate(request.items):
            try:
                device_id = check_device_id(item.device_id, self._device_ids, f"items[{index}].device_id")
            except InvalidArgument as exc:
                error = ItemError(exc.kind, exc.reason, exc.message)
                refused.append(BatchItemResult(index, item.device_id, None, error))
                continue
            accepted.append(
                (
                    index,
                    EnrollRequest(
                        device_id,
                        item.certificate_pem,
                        item.replace,
                        "",
                        item.owner_oem,
                        item.replace_reason,
                        caller,
                    ),
                )
            )
        batch = BatchResult(())
        if accepted or not refused:  # an empty batch is the domain's to refuse
            batch = await service.batch.enroll([r for _, r in accepted], request.request_id)
        items = list(batch.items)
        if refused:  # the domain numbered the accepted items only
            items = [replace(item, index=accepted[item.index][0]) for item in items] + refused
            items.sort(key=lambda i: i.index)
        if batch.replayed:
            self._metrics.enrolled("replayed", len(items))
        else:  # as count_enrollment counts each, one call per outcome
            outcomes = Counter(
                ("replayed" if i.result.replayed else i.result.outcome.value) if i.result else "refused"
                for i in items
            )
            for outcome, count in outcomes.items():
                self._metrics.enrolled(outcome, count)
            if outcomes[EnrollOutcome.REPLACED.value]:
                self._metrics.codes_rotated(outcomes[EnrollOutcome.REPLACED.value])
        return batch_to_proto(BatchResult(tuple(items), batch.replayed))

    async def TransferOwnership(
        self, request: pb.TransferOwnershipRequest, context: Context
    ) -> pb.TransferOwnershipResponse:
        device_id = check_device_id(request.device_id, self._device_ids)
        command = TransferCommand(
            device_id, request.owner_oem, request.reason, request.request_id, current_caller()
        )
        result = await self._service().ownership.transfer(command)
        return pb.TransferOwnershipResponse(
            device_id=result.device_id,
            owner_oem=result.owner,
            previous_owner_oem=result.previous_owner,
            changed=result.changed,
            replayed=result.replayed,
        )

    async def GetEnrollmentStatus(
        self, request: pb.GetEnrollmentStatusRequest, context: Context
    ) -> pb.GetEnrollmentStatusResponse:
        device_id = check_device_id(request.device_id, self._device_ids)
        return status_to_proto(await self._service().status(device_id))

    async def RotateActivationCode(
        self, request: pb.RotateActivationCodeRequest, context: Context
    ) -> pb.RotateActivationCodeResponse:
        device_id = check_device_id(request.device_id, self._device_ids)
        result = await self._service().codes.rotate(device_id, request.request_id)
        if not result.replayed:
            self._metrics.codes_rotated()
        return pb.RotateActivationCodeResponse(
            device_id=result.device_id, activation_code=result.activation_code or "", replayed=result.replayed
        )

    async def AcknowledgeActivationCodes(
        self, request: pb.AcknowledgeActivationCodesRequest, context: Context
    ) -> pb.AcknowledgeActivationCodesResponse:
        device_ids = [
            check_device_id(raw, self._device_ids, f"device_ids[{index}]")
            for index, raw in enumerate(request.device_ids)
        ]
        result = await self._service().codes.acknowledge(device_ids, request.request_id)
        return pb.AcknowledgeActivationCodesResponse(
            acknowledged_count=result.acknowledged, replayed=result.replayed
        )
