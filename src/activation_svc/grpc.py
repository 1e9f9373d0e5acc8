"""ActivationService over gRPC: convert the proto request, call the domain, convert the result, count it
(``provkit.metrics``: activations by outcome, the path taken or ``replayed`` / ``refused``)."""

from __future__ import annotations

from activation_svc.model import (
    ActivateCommand,
    ActivationPath,
    DeactivateCommand,
    Lifecycle,
    MetadataChange,
)
from activation_svc.service import ActivationService
from devprov.v1 import activation_service_pb2 as pb
from devprov.v1 import activation_service_pb2_grpc as pb_grpc
from provkit.context import current_caller
from provkit.device_id import DeviceIdPolicy, check_device_id
from provkit.errors import DomainError
from provkit.grpc_server import Context, ServiceBinding, binding
from provkit.metrics import NO_METRICS, DomainMetrics
from provkit.proto_names import timestamp

LIFECYCLE_TO_PROTO = {
    Lifecycle.ENROLLED: pb.LIFECYCLE_ENROLLED,
    Lifecycle.ACTIVATED: pb.LIFECYCLE_ACTIVATED,
    Lifecycle.REGISTERED: pb.LIFECYCLE_REGISTERED,
    Lifecycle.DEPROVISIONED: pb.LIFECYCLE_DEPROVISIONED,
}
PATH_TO_PROTO = {
    ActivationPath.UNCHANGED: pb.ACTIVATION_PATH_UNCHANGED,
    ActivationPath.ENROLLMENT: pb.ACTIVATION_PATH_ENROLLMENT,
    ActivationPath.ENROLLMENT_AND_HUB_TWIN: pb.ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN,
}
METADATA_CHANGE_TO_PROTO = {
    MetadataChange.KEPT: pb.METADATA_CHANGE_KEPT,
    MetadataChange.REPLACED: pb.METADATA_CHANGE_REPLACED,
    MetadataChange.CLEARED: pb.METADATA_CHANGE_CLEARED,
}


class ActivationServicer(pb_grpc.ActivationServiceServicer):
    def __init__(
        self,
        service: ActivationService,
        device_ids: DeviceIdPolicy = DeviceIdPolicy.GUID,
        metrics: DomainMetrics = NO_METRICS,
    ) -> None:
        self._service = service
        self._device_ids = device_ids  # checked here, at the boundary
        self._metrics = metrics

    async def Activate(
        self, request: pb.ActivateRequest, context: Context
    ) -> pb.ActivateResponse:
        try:
            result = await self._service.activate(
                ActivateCommand(
                    check_device_id(request.device_id, self._device_ids),
                    request.activation_code,
                    request.metadata_json,
                    request.hub,
                    request.request_id,
                    current_caller(),
                    request.expected_enrollment_etag,
                    request.clear_metadata,
                )
            )
        except DomainError:
            self._metrics.activated("refused")
            raise
        self._metrics.activated("replayed" if result.replayed else result.path.value)
        return pb.ActivateResponse(
            device_id=result.device_id,
            hub=result.hub,
            path=PATH_TO_PROTO[result.path],
            lifecycle=LIFECYCLE_TO_PROTO[result.lifecycle],
            enrollment_etag=result.enrollment_etag,
            registered_hub=result.registered_hub,
            replayed=result.replayed,
            owner_oem=result.owner,
            metadata_change=METADATA_CHANGE_TO_PROTO[result.metadata_change],
        )

    async def Deactivate(
        self, request: pb.DeactivateRequest, context: Context
    ) -> pb.DeactivateResponse:
        result = await self._service.deactivate(
            DeactivateCommand(
                check_device_id(request.device_id, self._device_ids),
                request.activation_code,
                request.request_id,
                current_caller(),
            )
        )
        return pb.DeactivateResponse(
            device_id=result.device_id,
            changed=result.changed,
            hub_device_disabled=result.hub_device_disabled,
            lifecycle=LIFECYCLE_TO_PROTO[result.lifecycle],
            replayed=result.replayed,
        )

    async def GetDeviceStatus(
        self, request: pb.GetDeviceStatusRequest, context: Context
    ) -> pb.GetDeviceStatusResponse:
        device_id = check_device_id(request.device_id, self._device_ids)
        status = await self._service.status(device_id, request.activation_code, current_caller())
        reply = pb.GetDeviceStatusResponse(
            device_id=status.device_id,
            lifecycle=LIFECYCLE_TO_PROTO[status.lifecycle],
            provisioning_status=status.provisioning_status,
            allocated_hub=status.allocated_hub,
            registered_hub=status.registered_hub,
            hub_device_status=status.hub_device_status,
            hub_connection_state=status.hub_connection_state,
            owner_oem=status.owner,
            enrollment_etag=status.enrollment_etag,
        )
        if status.last_activity is not None:
            reply.last_activity_time.CopyFrom(timestamp(status.last_activity))
        if status.activated_at is not None:
            reply.activated_time.CopyFrom(timestamp(status.activated_at))
        if status.deactivated_at is not None:
            reply.deactivated_time.CopyFrom(timestamp(status.deactivated_at))
        return reply

    async def GetMetadataTemplate(
        self, request: pb.GetMetadataTemplateRequest, context: Context
    ) -> pb.GetMetadataTemplateResponse:
        caller = current_caller()
        template = self._service.template_for(caller)
        if template is None:
            return pb.GetMetadataTemplateResponse(tenant=caller.oem or "")
        return pb.GetMetadataTemplateResponse(
            tenant=template.tenant, schema_json=template.text(), schema_digest=template.digest
        )

    def binding(self) -> ServiceBinding:
        return binding(
            self,
            pb_grpc.add_ActivationServiceServicer_to_server,
            pb.DESCRIPTOR.services_by_name["ActivationService"],
        )
