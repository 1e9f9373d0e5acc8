"""The Enroll / EnrollBatch / GetEnrollmentStatus RPCs: proto <-> domain conversions, no business rules.

``EnrollmentRpcs`` is mixed into ``factory_svc.servicer.FactoryServicer``; it expects ``self._enrollment``
(an ``EnrollmentService``, or None when enrollment is not configured: FAILED_PRECONDITION).
"""

from __future__ import annotations

from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.enrollment.model import (
    BatchResult,
    Delivery,
    EnrollmentState,
    EnrollmentStatus,
    EnrollOutcome,
    EnrollRequest,
    EnrollResult,
)
from factory_svc.enrollment.service import EnrollmentService
from provkit.device_id import DeviceIdPolicy, check_device_id, check_device_ids
from provkit.errors import FailedPrecondition

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
}


def _timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


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
    )
    if status.queued_at is not None:
        reply.queued_time.CopyFrom(_timestamp(status.queued_at))
    if status.delivered_at is not None:
        reply.delivered_time.CopyFrom(_timestamp(status.delivered_at))
    return reply


class EnrollmentRpcs:
    _enrollment: EnrollmentService | None
    _device_ids: DeviceIdPolicy

    def _service(self) -> EnrollmentService:
        if self._enrollment is None:
            raise FailedPrecondition(
                "ENROLLMENT_NOT_CONFIGURED", "this factory service has no DPS configured"
            )
        return self._enrollment

    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        device_id = check_device_id(request.device_id, self._device_ids)
        result = await self._service().enroll(
            EnrollRequest(device_id, request.certificate_pem, request.replace, request.request_id)
        )
        return result_to_proto(result)

    async def EnrollBatch(
        self, request: pb.EnrollBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnrollBatchResponse:
        ids = check_device_ids(
            [i.device_id for i in request.items], self._device_ids, lambda index: f"items[{index}].device_id"
        )
        items = [
            EnrollRequest(d, i.certificate_pem, i.replace) for d, i in zip(ids, request.items, strict=True)
        ]
        return batch_to_proto(await self._service().enroll_batch(items, request.request_id))

    async def GetEnrollmentStatus(
        self, request: pb.GetEnrollmentStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEnrollmentStatusResponse:
        device_id = check_device_id(request.device_id, self._device_ids)
        return status_to_proto(await self._service().status(device_id))
