"""Domain errors shared by the services: one exception tree, no transport knowledge.

API
---
``DomainError(reason, message, *, metadata=None, field_violations=(), retry_after=None)``
    Base class.  ``reason`` is a stable UPPER_SNAKE_CASE code that clients branch on (a member of the
    package's ``ReasonEnum``, see below; kept as its plain string); ``message`` is for people;
    ``metadata`` (str -> str) goes into ``google.rpc.ErrorInfo.metadata``; ``field_violations``
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

Reasons
-------
``ReasonEnum``   the base of every package's reasons: a ``StrEnum`` whose member *is* its wire string (so
    ``reason == "ACTIVATION_DENIED"`` holds and the ``ErrorInfo`` is unchanged), declared as
    ``NAME = auto(), "what it means"``; ``.meaning`` is that one line and ``markdown()`` renders the
    package's table for docs/error-reasons.md (a test keeps those tables equal to the enums).
``Reason``   the reasons every service shares: the caller's identity and access, request ids, device ids,
    the cloud (DPS / hub unreachable or refusing, records changed concurrently), and a device certificate
    found unusable (the factory refuses to enroll it, the device client to use it).

Configuration
-------------
``ConfigurationError``   the root of "the program cannot run with these settings, files or arguments": a
    person fixes them, it is not a bug.  ``provkit.settings.SettingsError`` (and ``CloudNotConfigured``),
    ``provkit.grpc_server.ServerConfigError`` and the services' own derive from it (each keeping its old
    built-in base too); ``InputError`` is a command's argument or input file it cannot use.  The CLIs
    catch this root, never a bare ``ValueError``.  dbstore's ``UrlError``
    sits below provkit and cannot derive from it: its one reader (``provkit.settings.database_url``)
    turns it into a ``SettingsError``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Self

from mainkit.settings import ConfigurationError as ConfigurationError

_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,62}[A-Z0-9]$")


class InputError(ConfigurationError, ValueError):
    """A command-line argument or an input file a command cannot use (a ValueError too, as it was)."""


class ReasonEnum(enum.StrEnum):
    """A package's error reasons: ``NAME = auto(), "one line: what it means"``; the value is the name."""

    meaning: str

    def __new__(cls, value: str, meaning: str) -> Self:
        if not _REASON.match(value):
            raise ValueError(f"error reason must be UPPER_SNAKE_CASE, got {value!r}")
        if not meaning:
            raise ValueError(f"reason {value} needs a one-line meaning")
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list[str]) -> str:
        return name

    @classmethod
    def markdown(cls) -> str:
        """The reasons as the table in docs/error-reasons.md shows them."""
        lines = ["| reason | meaning |", "| --- | --- |"]
        lines.extend(f"| `{member.value}` | {member.meaning} |" for member in cls)
        return "\n".join(lines)


class Reason(ReasonEnum):
    """The reasons every service shares (provkit raises the first ones itself)."""

    CALLER_IDENTITY_UNRECOGNISED = enum.auto(), "the client certificate names no party (or two)"
    CLIENT_CERTIFICATE_REQUIRED = enum.auto(), "the call came without a client certificate naming a party"
    CALLER_NOT_AUTHORIZED = enum.auto(), "the caller's role may not call this RPC (the access table)"
    REQUEST_ID_INVALID = enum.auto(), "the request id is not 1-128 printable ASCII characters"
    REQUEST_ID_REUSED = enum.auto(), "the request id was already used for a different request"
    REQUEST_IN_PROGRESS = enum.auto(), "another replica still executes this request id: retry it later"
    DEVICE_ID_EMPTY = enum.auto(), "the device id is empty"
    DEVICE_ID_NOT_A_GUID = enum.auto(), "the device id is not a GUID (the default device id policy)"
    DEVICE_ID_TOO_LONG = enum.auto(), "the registration id is longer than 64 characters (the certificate CN)"
    DEVICE_ID_INVALID_CHARACTERS = enum.auto(), "the registration id has characters DPS does not allow"
    DEVICE_ID_INVALID_LAST_CHARACTER = enum.auto(), "the registration id ends with a character DPS refuses"
    DPS_UNAVAILABLE = enum.auto(), "DPS cannot be reached (or is throttling): retry after the delay given"
    DPS_REFUSED = enum.auto(), "DPS refused the request (a bad record or missing rights)"
    HUB_UNAVAILABLE = enum.auto(), "the IoT hub cannot be reached (or is throttling): retry after the delay"
    HUB_REFUSED = enum.auto(), "the IoT hub refused the request"
    ENROLLMENT_CONCURRENTLY_MODIFIED = enum.auto(), "the DPS enrollment kept changing meanwhile: call again"
    HUB_DEVICE_CONCURRENTLY_MODIFIED = enum.auto(), "the hub device identity kept changing: call again"
    CERTIFICATE_SUBJECT_MISMATCH = enum.auto(), "the certificate's CN is not the device id"
    CERTIFICATE_EXPIRED = enum.auto(), "the device certificate has expired"
    CERTIFICATE_NOT_YET_VALID = enum.auto(), "the device certificate is not valid yet (check the clock)"
    CERTIFICATE_REVOKED = (
        enum.auto(),
        "the device certificate is revoked (the factory's ledger or a verified CRL lists it): mint a new one",
    )
    INTERNAL = enum.auto(), "an unexpected failure (logged with the request id); not the caller's fault"


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
        self.reason = str(reason)  # a ReasonEnum member as its wire string: one type downstream
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
