"""The one table from domain errors to gRPC status, and its reverse for clients.

API
---
``STATUS_BY_KIND: Mapping[ErrorKind, grpc.StatusCode]``   the table.  Reasons every service shares:
    REQUEST_ID_REUSED and REQUEST_ID_INVALID (``InvalidArgument``), REQUEST_IN_PROGRESS (``Aborted``, with
    a retry delay), from ``provkit.idempotency``.
``to_grpc_status(error: DomainError, domain: str, *, request_id="") -> grpc.Status``
    A ``google.rpc.Status`` (packed by grpcio-status) with ``ErrorInfo(reason, domain, metadata)``, a
    ``BadRequest`` when the error has field violations, ``RetryInfo`` when it has ``retry_after``.
``internal_status(request_id: str, domain: str) -> grpc.Status``   INTERNAL, generic message.
``RpcErrorDetails`` / ``error_details(exc: grpc.RpcError) -> RpcErrorDetails``   client side: the code,
    message, reason, domain, metadata, field violations and retry delay decoded from a failed call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from provkit.errors import DomainError, ErrorKind, FieldViolation, Reason

STATUS_BY_KIND: Mapping[ErrorKind, grpc.StatusCode] = MappingProxyType(
    {
        ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
        ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
        ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
        ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
        ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
        ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
        ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
        ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
assert set(STATUS_BY_KIND) == set(ErrorKind), "every ErrorKind needs a status code"


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_grpc_status(error: DomainError, domain: str, *, request_id: str = "") -> grpc.Status:
    code = STATUS_BY_KIND[error.kind]
    metadata = dict(error.metadata)
    if request_id:
        metadata.setdefault("request_id", request_id)
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=metadata))]
    if error.field_violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.field_violations
                    ]
                )
            )
        )
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=error.message, details=details))


def internal_status(request_id: str, domain: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason=Reason.INTERNAL.value, domain=domain, metadata={"request_id": request_id}
    )
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=f"internal error (request id {request_id})",
            details=[_pack(info)],
        )
    )


@dataclass(frozen=True)
class RpcErrorDetails:
    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: tuple[FieldViolation, ...] = ()
    retry_after: float | None = None


def _trailing(exc: grpc.RpcError) -> tuple[tuple[str, str | bytes], ...]:
    # Sync errors give (key, value) namedtuples, aio errors a Metadata of (key, value) tuples.
    trailing: Iterable[object] = exc.trailing_metadata() or () if hasattr(exc, "trailing_metadata") else ()
    pairs: list[tuple[str, str | bytes]] = []
    for item in trailing:
        if isinstance(item, tuple) and len(item) == 2:
            key, value = item
            if isinstance(key, str) and isinstance(value, str | bytes):
                pairs.append((key, value))
    return tuple(pairs)


def error_details(exc: grpc.RpcError) -> RpcErrorDetails:
    """Decode a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = exc.code()
    message = exc.details() or ""
    status = None
    for key, value in _trailing(exc):
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
    if status is None:
        return RpcErrorDetails(code=code, message=message)
    reason, domain, metadata = "", "", {}
    violations: list[FieldViolation] = []
    retry_after = None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Unpack(bad):
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.ToMilliseconds() / 1000
    return RpcErrorDetails(code, message, reason, domain, metadata, tuple(violations), retry_after)
