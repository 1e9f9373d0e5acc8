"""Domain errors shared by the services: one exception tree, no transport knowledge.

API
---
``DomainError(reason, message, *, metadata=None, field_violations=(), retry_after=None)``
    Base class.  ``reason`` is a stable UPPER_SNAKE_CASE code that clients branch on; ``message`` is for
    people; ``metadata`` (str -> str) goes into ``google.rpc.ErrorInfo.metadata``; ``field_violations``
    (``FieldViolation(field, description)``) become ``google.rpc.BadRequest``; ``retry_after`` (seconds)
    becomes ``google.rpc.RetryInfo``.
Subclasses, one per kind of failure (the gRPC layer maps each kind to one status code, see
``provkit.grpc_errors.STATUS_BY_KIND``):
    ``InvalidArgument``, ``NotFound``, ``AlreadyExists``, ``FailedPrecondition``, ``PermissionDenied``,
    ``Unauthenticated``, ``ResourceExhausted``, ``Unavailable``, ``Aborted`` (concurrent work conflicted),
    ``DeadlineExceeded``.
``invalid_field(field, reason, description, **metadata) -> InvalidArgument``
    Shorthand for an InvalidArgument with one field violation.

Services derive their own errors from these classes (e.g. ``class CsrInvalid(InvalidArgument)``) or raise
them directly with their own reason.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,62}[A-Z0-9]$")


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    PERMISSION_DENIED = "permission_denied"
    UNAUTHENTICATED = "unauthenticated"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    ABORTED = "aborted"
    DEADLINE_EXCEEDED = "deadline_exceeded"


@dataclass(frozen=True)
class FieldViolation:
    field: str  # a path into the request, e.g. "csr_pem" or "server_key_generation.key_type"
    description: str


class DomainError(Exception):
    """A failure the caller can understand and act on."""

    kind: ClassVar[ErrorKind] = ErrorKind.FAILED_PRECONDITION

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        retry_after: float | None = None,
    ) -> None:
        if not _REASON.match(reason):
            raise ValueError(f"error reason must be UPPER_SNAKE_CASE, got {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.message!r})"


class InvalidArgument(DomainError):
    kind = ErrorKind.INVALID_ARGUMENT


class NotFound(DomainError):
    kind = ErrorKind.NOT_FOUND


class AlreadyExists(DomainError):
    kind = ErrorKind.ALREADY_EXISTS


class FailedPrecondition(DomainError):
    kind = ErrorKind.FAILED_PRECONDITION


class PermissionDenied(DomainError):
    kind = ErrorKind.PERMISSION_DENIED


class Unauthenticated(DomainError):
    kind = ErrorKind.UNAUTHENTICATED


class ResourceExhausted(DomainError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(DomainError):
    kind = ErrorKind.UNAVAILABLE


class Aborted(DomainError):
    """A conflict with concurrent work (etag mismatch, lost race); retrying the whole operation may work."""

    kind = ErrorKind.ABORTED



class DeadlineExceeded(DomainError):
    kind = ErrorKind.DEADLINE_EXCEEDED


def invalid_field(field: str, reason: str, description: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument(
        reason,
        description,
        metadata={"field": field, **metadata},
        field_violations=[FieldViolation(field, description)],
    )
