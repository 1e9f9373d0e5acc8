"""The RevokeCertificate RPC: proto <-> ``factory_svc.revocation.service``, no business rules.

``RevocationRpcs`` is one part of ``factory_svc.app.FactoryServicer``, which sets ``_revocation`` (None when
the factory cannot revoke: FAILED_PRECONDITION), ``_device_ids`` and ``_metrics``.
"""

from __future__ import annotations

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.errors import FailedPrecondition, Reason, invalid_field
from factory_svc.mint.grpc import REASON_FROM_PROTO, certificate_to_proto
from factory_svc.revocation.model import RevokeRequest
from factory_svc.revocation.service import RevocationService
from provkit.context import current_caller
from provkit.device_id import DeviceIdPolicy, check_device_id
from provkit.grpc_server import Context
from provkit.metrics import SuiteMetrics
from provkit.proto_names import timestamp


def revoke_request_from_proto(request: pb.RevokeCertificateRequest, caller: str) -> RevokeRequest:
    if request.reason not in REASON_FROM_PROTO:
        message = f"unknown revocation reason {request.reason}"
        raise invalid_field("reason", Reason.REVOCATION_REASON_INVALID, message)
    return RevokeRequest(
        device_id=request.device_id,
        serial_number=request.serial_number,
        reason=REASON_FROM_PROTO[request.reason],
        request_id=request.request_id,
        caller=caller,
    )


class RevocationRpcs:
    _revocation: RevocationService | None
    _device_ids: DeviceIdPolicy
    _metrics: SuiteMetrics

    async def RevokeCertificate(
        self, request: pb.RevokeCertificateRequest, context: Context
    ) -> pb.RevokeCertificateResponse:
        if self._revocation is None:
            raise FailedPrecondition(
                Reason.REVOCATION_NOT_CONFIGURED, "this factory cannot revoke certificates"
            )
        if request.device_id:
            check_device_id(request.device_id, self._device_ids)
        result = await self._revocation.revoke(revoke_request_from_proto(request, str(current_caller())))
        if result.newly_revoked:
            self._metrics.revoked(result.newly_revoked)
        return pb.RevokeCertificateResponse(
            device_id=result.device_id,
            certificates=[certificate_to_proto(c) for c in result.certificates],
            newly_revoked_count=result.newly_revoked,
            enrollment_disabled=result.enrollment_disabled,
            hub_identity_disabled=result.hub_identity_disabled,
            crl_number=result.crl.number,
            crl_this_update=timestamp(result.crl.crl.last_update_utc),
        )
