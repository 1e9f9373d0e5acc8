"""The minting RPCs (MintCertificate, ListCertificates, GetCertificate): convert the proto request, call the
domain, convert the result, count it (``provkit.metrics``: certificates minted by key source and key type).

Also the certificate record's conversions every feature's RPCs use (``certificate_to_proto``, key types,
revocation reasons).  ``MintRpcs`` is one part of ``factory_svc.app.FactoryServicer``.
"""

from __future__ import annotations

from datetime import timedelta

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.errors import Reason, invalid_field
from factory_svc.mint.keys import KeyType
from factory_svc.mint.model import CsrKey, IssuedCertificate, KeySource, MintRequest, ServerKey
from factory_svc.mint.service import CertificateCatalog, MintingService
from factory_svc.revocation.model import RevocationReason
from provkit.context import current_caller
from provkit.device_id import DeviceIdPolicy, check_device_id
from provkit.grpc_server import Context
from provkit.metrics import SuiteMetrics
from provkit.proto_names import set_time

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
    set_time(message.not_before, cert.not_before)
    set_time(message.not_after, cert.not_after)
    set_time(message.issue_time, cert.issued_at)
    message.key_type = KEY_TYPE_TO_PROTO[cert.key_type]
    message.key_source = KEY_SOURCE_TO_PROTO[cert.key_source]
    message.caller_identity = cert.caller
    message.request_id = cert.request_id
    if cert.revocation is not None:
        message.revoked = True
        set_time(message.revocation_time, cert.revocation.time)
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
                "server_key_generation.key_type", Reason.KEY_TYPE_UNSUPPORTED, f"unknown key type {wanted}"
            )
    else:
        raise invalid_field("key_source", Reason.KEY_SOURCE_MISSING, "set csr_pem or server_key_generation")
    validity = None
    if request.HasField("validity"):
        validity = timedelta(seconds=request.validity.seconds, microseconds=request.validity.nanos // 1000)
    return MintRequest(request.device_id, key, validity, request.request_id, caller)


class MintRpcs:
    """MintCertificate, ListCertificates and GetCertificate; mixed into ``factory_svc.app.FactoryServicer``,
    which sets ``_minting``, ``_catalog``, ``_device_ids`` and ``_metrics``."""

    _minting: MintingService
    _catalog: CertificateCatalog
    _device_ids: DeviceIdPolicy
    _metrics: SuiteMetrics

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
        page = await self._catalog.page(device_id, request.page_size, request.page_token)
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
