"""FactoryService over gRPC: convert the proto request, call the domain, convert the result, count it
(``provkit.metrics``: certificates minted by key source and key type; enrollments by outcome).

``FactoryServicer`` holds the domain services (minting, the certificate catalog and, when configured,
enrollment, whose RPCs come from ``EnrollmentRpcs``) and has one thin method per RPC; the server builder
(``factory_svc.app``) wires the services.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from factory_svc.enrollment.grpc_api import EnrollmentRpcs
from factory_svc.enrollment.service import EnrollmentService
from factory_svc.errors import FailedPrecondition, invalid_field
from factory_svc.keys import KeyType
from factory_svc.lots import LotService
from factory_svc.lots_grpc import LotRpcs
from factory_svc.minting import CertificateCatalog, MintingService
from factory_svc.model import CsrKey, IssuedCertificate, KeySource, MintRequest, RevocationReason, ServerKey
from factory_svc.revocation import RevocationService, RevokeRequest
from provkit.context import current_caller
from provkit.device_id import DeviceIdPolicy, check_device_id
from provkit.grpc_server import Context, ServiceBinding, binding
from provkit.metrics import NO_METRICS, SuiteMetrics

KEY_TYPE_TO_PROTO = {
    KeyType.EC_P256: pb.KEY_TYPE_EC_P256,
    KeyType.EC_P384: pb.KEY_TYPE_EC_P384,
    KeyType.RSA_2048: pb.KEY_TYPE_RSA_2048,
    KeyType.RSA_3072: pb.KEY_TYPE_RSA_3072,
    KeyType.RSA_OTHER: pb.KEY_TYPE_RSA_OTHER,
}
KEY_TYPE_FROM_PROTO = {v: k for k, v in KEY_TYPE_TO_PROTO.items()}
KEY_SOURCE_TO_PROTO = {
    KeySource.CSR: pb.KEY_SOURCE_CSR,
    KeySource.SERVER_GENERATED: pb.KEY_SOURCE_SERVER_GENERATED,
}


REASON_TO_PROTO = {
    RevocationReason.UNSPECIFIED: pb.REVOCATION_REASON_UNSPECIFIED,
    RevocationReason.KEY_COMPROMISE: pb.REVOCATION_REASON_KEY_COMPROMISE,
    RevocationReason.CA_COMPROMISE: pb.REVOCATION_REASON_CA_COMPROMISE,
    RevocationReason.AFFILIATION_CHANGED: pb.REVOCATION_REASON_AFFILIATION_CHANGED,
    RevocationReason.SUPERSEDED: pb.REVOCATION_REASON_SUPERSEDED,
    RevocationReason.CESSATION_OF_OPERATION: pb.REVOCATION_REASON_CESSATION_OF_OPERATION,
    RevocationReason.CERTIFICATE_HOLD: pb.REVOCATION_REASON_CERTIFICATE_HOLD,
    RevocationReason.PRIVILEGE_WITHDRAWN: pb.REVOCATION_REASON_PRIVILEGE_WITHDRAWN,
    RevocationReason.AA_COMPROMISE: pb.REVOCATION_REASON_AA_COMPROMISE,
}
REASON_FROM_PROTO = {v: k for k, v in REASON_TO_PROTO.items()}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """Same value as ``Timestamp.FromDatetime`` for an aware datetime, without its Python-level work."""
    message = timestamp_pb2.Timestamp()
    _set_time(message, moment)
    return message


def _set_time(field: timestamp_pb2.Timestamp, moment: datetime) -> None:
    delta = moment - _EPOCH  # days may be negative; seconds and microseconds never are
    field.seconds = delta.days * 86_400 + delta.seconds
    field.nanos = delta.microseconds * 1_000


def certificate_to_proto(
    cert: IssuedCertificate, message: pb.IssuedCertificate | None = None
) -> pb.IssuedCertificate:
    """``cert`` as a message; written into ``message`` (a field of the response being built) when given, so
    the PEM strings are not copied twice."""
    message = pb.IssuedCertificate() if message is None else message
    message.serial_number = cert.serial_number
    message.device_id = cert.device_id
    message.certificate_pem = cert.certificate_pem
    message.certificate_chain_pem = cert.chain_pem
    message.sha1_thumbprint = cert.sha1_thumbprint
    message.sha256_thumbprint = cert.sha256_thumbprint
    _set_time(message.not_before, cert.not_before)
    _set_time(message.not_after, cert.not_after)
    _set_time(message.issue_time, cert.issued_at)
    message.key_type = KEY_TYPE_TO_PROTO[cert.key_type]
    message.key_source = KEY_SOURCE_TO_PROTO[cert.key_source]
    message.caller_identity = cert.caller
    message.request_id = cert.request_id
    if cert.revocation is not None:
        message.revoked = True
        _set_time(message.revocation_time, cert.revocation.time)
        message.revocation_reason = REASON_TO_PROTO[cert.revocation.reason]
    return message


def mint_request_from_proto(request: pb.MintCertificateRequest, caller: str) -> MintRequest:
    source = request.WhichOneof("key_source")
    key: CsrKey | ServerKey
    if source == "csr_pem":
        key = CsrKey(request.csr_pem.encode("utf-8", "replace"))
    elif source == "server_key_generation":
        wanted = request.server_key_generation.key_type
        if wanted == pb.KEY_TYPE_UNSPECIFIED:
            key = ServerKey(KeyType.EC_P256)
        elif wanted in KEY_TYPE_FROM_PROTO:
            key = ServerKey(KEY_TYPE_FROM_PROTO[wanted])
        else:
            raise invalid_field(
                "server_key_generation.key_type", "KEY_TYPE_UNSUPPORTED", f"unknown key type {wanted}"
            )
    else:
        raise invalid_field("key_source", "KEY_SOURCE_MISSING", "set csr_pem or server_key_generation")
    validity = None
    if request.HasField("validity"):
        validity = timedelta(seconds=request.validity.seconds, microseconds=request.validity.nanos // 1000)
    return MintRequest(request.device_id, key, validity, request.request_id, caller)


def revoke_request_from_proto(request: pb.RevokeCertificateRequest, caller: str) -> RevokeRequest:
    if request.reason not in REASON_FROM_PROTO:
        message = f"unknown revocation reason {request.reason}"
        raise invalid_field("reason", "REVOCATION_REASON_INVALID", message)
    return RevokeRequest(
        device_id=request.device_id,
        serial_number=request.serial_number,
        reason=REASON_FROM_PROTO[request.reason],
        request_id=request.request_id,
        caller=caller,
    )


class FactoryServicer(LotRpcs, EnrollmentRpcs, pb_grpc.FactoryServiceServicer):
    def __init__(
        self,
        minting: MintingService,
        catalog: CertificateCatalog,
        enrollment: EnrollmentService | None = None,
        device_ids: DeviceIdPolicy = DeviceIdPolicy.GUID,
        metrics: SuiteMetrics = NO_METRICS,
        revocation: RevocationService | None = None,
        lots: LotService | None = None,
    ) -> None:
        self._device_ids = device_ids  # checked here, at the boundary (EnrollmentRpcs too)
        if lots is not None:
            self._lots = lots  # MintCertificates (LotRpcs)
        self._minting = minting
        self._catalog = catalog
        self._revocation = revocation
        self._enrollment = enrollment  # Enroll / EnrollBatch / GetEnrollmentStatus (EnrollmentRpcs)
        self._metrics = metrics

    async def MintCertificate(
        self, request: pb.MintCertificateRequest, context: Context
    ) -> pb.MintCertificateResponse:
        check_device_id(request.device_id, self._device_ids)
        result = await self._minting.mint(mint_request_from_proto(request, str(current_caller())))
        if not result.replayed:
            issued = result.certificate
            self._metrics.minted(issued.key_source.value, issued.key_type.value)
        response = pb.MintCertificateResponse(
            unexpired_certificate_count=result.unexpired_count, replayed=result.replayed
        )
        certificate_to_proto(result.certificate, response.certificate)
        if result.private_key_pem is not None:
            response.private_key_pem = result.private_key_pem.decode()
        return response

    async def ListCertificates(
        self, request: pb.ListCertificatesRequest, context: Context
    ) -> pb.ListCertificatesResponse:
        device_id = check_device_id(request.device_id, self._device_ids) if request.device_id.strip() else ""
        page = await self._catalog.list(device_id, request.page_size, request.page_token)
        return pb.ListCertificatesResponse(
            certificates=[certificate_to_proto(c) for c in page.certificates],
            next_page_token=page.next_page_token,
        )

    async def GetCertificate(
        self, request: pb.GetCertificateRequest, context: Context
    ) -> pb.GetCertificateResponse:
        return pb.GetCertificateResponse(
            certificate=certificate_to_proto(await self._catalog.get(request.serial_number))
        )

    async def RevokeCertificate(
        self, request: pb.RevokeCertificateRequest, context: Context
    ) -> pb.RevokeCertificateResponse:
        if self._revocation is None:
            raise FailedPrecondition("REVOCATION_NOT_CONFIGURED", "this factory cannot revoke certificates")
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
            crl_this_update=_timestamp(result.crl.crl.last_update_utc),
        )

    def binding(self) -> ServiceBinding:
        return binding(
            self,
            pb_grpc.add_FactoryServiceServicer_to_server,
            pb.DESCRIPTOR.services_by_name["FactoryService"],
        )
