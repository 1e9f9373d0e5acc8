"""The factory side of `provision`: FactoryService over gRPC with the generated stubs.

Insecure (loopback only), TLS, or mutual TLS as configured.  gRPC failures become :class:`FactoryError`
carrying the service's ErrorInfo reason (or FACTORY_UNAVAILABLE for an unreachable factory: then the
connection is tried by hand, ``provkit.channels.diagnose_connection``, and the error says why it fails,
e.g. plaintext against the factory's TLS, with the hint to point the shell at the stack when the factory's
TLS is not configured).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any

import grpc

from device_client.errors import FactoryError, Reason
from device_client.factory_port import EnrollDelivery, EnrollOutcome, MintedCertificate
from device_client.identity import KeyType
from device_client.settings import FactorySettings, FactoryTls
from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from provkit.channels import (
    STACK_HINT,
    ChannelSecurity,
    create_channel,
    diagnose_connection,
    request_metadata,
)
from provkit.grpc_errors import error_details

_KEY_TYPES = {
    KeyType.EC_P256: pb.KEY_TYPE_EC_P256,
    KeyType.EC_P384: pb.KEY_TYPE_EC_P384,
    KeyType.RSA_2048: pb.KEY_TYPE_RSA_2048,
    KeyType.RSA_3072: pb.KEY_TYPE_RSA_3072,
}


def _security(settings: FactorySettings) -> ChannelSecurity:
    if settings.tls is FactoryTls.INSECURE:
        return ChannelSecurity(insecure=True)
    try:
        return ChannelSecurity.from_files(
            ca_file=settings.ca_file,
            cert_file=settings.client_cert_file if settings.tls is FactoryTls.MTLS else None,
            key_file=settings.client_key_file if settings.tls is FactoryTls.MTLS else None,
        )
    except OSError as exc:
        raise FactoryError(
            f"cannot read a factory TLS file {exc.filename}: {exc.strerror}",
            Reason.FACTORY_TLS_FILE_UNREADABLE,
        ) from exc


def to_factory_error(exc: grpc.RpcError, address: str, cause: str | None = None) -> FactoryError:
    """``cause``: why the connection fails, when it was tried by hand (``diagnose_connection``)."""
    details = error_details(exc)
    code = details.code
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not details.reason:
        if cause is not None:
            message = f"cannot reach the factory at {address} as configured: {cause}"
        else:
            message = f"factory at {address} is unreachable ({code.name.lower()}): {details.message}"
        return FactoryError(message, Reason.FACTORY_UNAVAILABLE, {"code": code.name})
    return FactoryError(
        f"factory refused the request: {details.message} ({code.name})",
        details.reason or code.name,
        dict(details.metadata),
    )


class GrpcFactory:
    """FactoryPort over gRPC; use as an async context manager."""

    def __init__(self, settings: FactorySettings, *, stub: pb_grpc.FactoryServiceStub | None = None) -> None:
        """With ``stub`` the caller owns the channel; otherwise one is opened from ``settings``."""
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._stub = stub

    async def __aenter__(self) -> GrpcFactory:
        if self._stub is None:
            self._channel = create_channel(self._settings.address, _security(self._settings))
            self._stub = pb_grpc.FactoryServiceStub(self._channel)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def _call(self, method: Any, request: Any, rid: str) -> Any:
        try:
            return await method(request, timeout=self._settings.timeout_s, metadata=request_metadata(rid))
        except grpc.RpcError as exc:
            cause = await self._diagnose(exc)
            error = to_factory_error(exc, self._settings.address, cause)
            if cause is not None and self._settings.ca_file is None:  # its TLS never configured here
                error.hints = (STACK_HINT,)
            raise error from exc

    async def _diagnose(self, exc: grpc.RpcError) -> str | None:
        """Why the factory cannot be reached as configured (None: it was not that, or nothing found)."""
        if error_details(exc).code is not grpc.StatusCode.UNAVAILABLE:
            return None
        return await asyncio.to_thread(diagnose_connection, self._settings.address, _security(self._settings))

    async def mint_with_csr(
        self, guid: str, csr_pem: bytes, request_id: str, *, validity: timedelta | None = None
    ) -> MintedCertificate:
        assert self._stub is not None
        request = pb.MintCertificateRequest(device_id=guid, csr_pem=csr_pem.decode(), request_id=request_id)
        if validity is not None:
            request.validity.FromTimedelta(validity)
        response = await self._call(self._stub.MintCertificate, request, request_id)
        return MintedCertificate(response.certificate.certificate_chain_pem.encode(), None)

    async def mint_with_server_key(
        self, guid: str, key_type: KeyType, request_id: str, *, validity: timedelta | None = None
    ) -> MintedCertificate:
        assert self._stub is not None
        request = pb.MintCertificateRequest(
            device_id=guid,
            server_key_generation=pb.ServerKeyGeneration(key_type=_KEY_TYPES[key_type]),
            request_id=request_id,
        )
        if validity is not None:
            request.validity.FromTimedelta(validity)
        response = await self._call(self._stub.MintCertificate, request, request_id)
        key = response.private_key_pem.encode() if response.private_key_pem else None
        return MintedCertificate(response.certificate.certificate_chain_pem.encode(), key)

    async def enroll(
        self, guid: str, certificate_pem: bytes, request_id: str, *, replace: bool
    ) -> EnrollOutcome:
        assert self._stub is not None
        request = pb.EnrollRequest(
            device_id=guid, certificate_pem=certificate_pem.decode(), replace=replace, request_id=request_id
        )
        return _outcome(await self._call(self._stub.Enroll, request, request_id))

    async def enroll_batch(
        self, certificates: Sequence[tuple[str, bytes]], request_id: str
    ) -> list[EnrollOutcome | str]:
        """EnrollBatch (at most 1,000 devices): per device, its outcome or why it was refused."""
        assert self._stub is not None
        request = pb.EnrollBatchRequest(
            items=[pb.EnrollBatchItem(device_id=g, certificate_pem=pem.decode()) for g, pem in certificates],
            request_id=request_id,
        )
        response = await self._call(self._stub.EnrollBatch, request, request_id)
        return [
            _outcome(r.response) if r.HasField("response") else f"{r.error.reason}: {r.error.message}"
            for r in response.results
        ]


def _outcome(response: pb.EnrollResponse) -> EnrollOutcome:
    queued = response.delivery == pb.ENROLLMENT_DELIVERY_QUEUED
    return EnrollOutcome(
        delivery=EnrollDelivery.QUEUED if queued else EnrollDelivery.LIVE,
        unchanged=response.outcome == pb.ENROLL_OUTCOME_UNCHANGED,
        activation_code=response.activation_code or None,
    )
