"""Per-request context shared by handlers and logs (contextvars, set by the gRPC server's call wrapper).

API
---
``CallerIdentity(kind, common_name=None, sha256_thumbprint=None, peer="")``  what the transport proved:
    ``str(identity)`` is ``"<CN> sha256:<THUMBPRINT>"`` for an mTLS caller, ``"tls-anonymous:<peer>"`` for a
    TLS caller without a client certificate, ``"insecure:<peer>"`` otherwise.
``Role``        the parties: FACTORY (the MES and the factory test bench that runs ``device-client
                provision``), OEM (the machine manufacturer's back office), PORTAL (the activation web
                portal, acting for one OEM), OPERATOR (whoever runs the services); INTERNAL is in-process
                work (CLIs, tests, start-up) and is never taken from a certificate.
``Caller(role, tenant, identity, on_behalf_of="")``   who is calling, resolved once per call from the
                verified client certificate (``provkit.parties``): ``.uri`` (``urn:devprov:<role>:<tenant>``),
                ``.oem`` (the OEM an OEM or portal caller acts for, else None), ``.on_behalf_of`` (a portal
                only: the end user's address it forwards in ``x-devprov-on-behalf-of``),
                ``str(caller)`` is the form written to ledgers and audit logs:
                ``"<uri> [for <end user>] <CN> sha256:<THUMBPRINT>"``.
``current_request_id() -> str``      the request id of the running RPC ("" outside one).
``deadline_scope(deadline)`` / ``current_deadline() -> float | None``   when the running RPC's caller stops
                waiting (``time.monotonic()`` seconds; None: it set no deadline, or outside an RPC).
``current_caller() -> Caller``       who is calling (``Caller.internal()`` outside an RPC).
``bind_device_id(device_id)``        context manager: logs inside carry ``device_id``.
``request_scope(request_id, caller)``  context manager used by the server (and by tests/CLIs).
"""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass
from typing import Literal

CallerKind = Literal["mtls", "tls-anonymous", "insecure", "internal"]


@dataclass(frozen=True)
class CallerIdentity:
    kind: CallerKind
    common_name: str | None = None
    sha256_thumbprint: str | None = None  # upper-case hex of the client certificate's DER
    peer: str = ""

    @classmethod
    def internal(cls) -> CallerIdentity:
        return cls("internal")

    @property
    def authenticated(self) -> bool:
        return self.kind == "mtls"

    def __str__(self) -> str:
        if self.kind == "mtls":
            return f"{self.common_name or '(no CN)'} sha256:{self.sha256_thumbprint}"
        if self.kind in ("insecure", "tls-anonymous") and self.peer:
            return f"{self.kind}:{self.peer}"
        return self.kind


class Role(enum.StrEnum):
    FACTORY = "factory"
    OEM = "oem"
    PORTAL = "portal"
    OPERATOR = "operator"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Caller:
    role: Role
    tenant: str
    identity: CallerIdentity
    on_behalf_of: str = ""  # the portal's end user (its client address), as the portal says

    @classmethod
    def internal(cls) -> Caller:
        return cls(Role.INTERNAL, "", CallerIdentity.internal())

    @property
    def uri(self) -> str:
        return f"urn:devprov:{self.role.value}:{self.tenant}" if self.tenant else f"urn:devprov:{self.role}"

    @property
    def oem(self) -> str | None:
        """The OEM this caller acts for: an OEM's own id, or the OEM a portal certificate serves."""
        return self.tenant if self.role in (Role.OEM, Role.PORTAL) else None

    def __str__(self) -> str:
        if self.role is Role.INTERNAL:
            return "internal"
        end_user = f" for {self.on_behalf_of}" if self.on_behalf_of else ""
        return f"{self.uri}{end_user} {self.identity}"


request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)
device_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("device_id", default="")
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


def current_deadline() -> float | None:
    return deadline_var.get()


class deadline_scope:
    """``with deadline_scope(deadline):`` the running RPC's deadline (a plain class: set on every call)."""

    __slots__ = ("_deadline", "_token")

    def __init__(self, deadline: float | None) -> None:
        self._deadline = deadline

    def __enter__(self) -> None:
        self._token = deadline_var.set(self._deadline)

    def __exit__(self, *exc: object) -> None:
        deadline_var.reset(self._token)


def current_request_id() -> str:
    return request_id_var.get()


def current_caller() -> Caller:
    return caller_var.get() or Caller.internal()


def current_device_id() -> str:
    return device_id_var.get()


# Both scopes are entered on every RPC: plain classes, not generator-based context managers (a third of
# the cost).
class bind_device_id:
    """``with bind_device_id(device_id):`` logs inside carry ``device_id``."""

    __slots__ = ("_device_id", "_token")

    def __init__(self, device_id: str) -> None:
        self._device_id = device_id

    def __enter__(self) -> None:
        self._token = device_id_var.set(self._device_id)

    def __exit__(self, *exc: object) -> None:
        device_id_var.reset(self._token)


class request_scope:
    """``with request_scope(request_id, caller):`` the RPC's request id and caller (device id cleared)."""

    __slots__ = ("_caller", "_request_id", "_tokens")

    def __init__(self, request_id: str, caller: Caller) -> None:
        self._request_id = request_id
        self._caller = caller

    def __enter__(self) -> None:
        self._tokens = (
            request_id_var.set(self._request_id),
            caller_var.set(self._caller),
            device_id_var.set(""),
        )

    def __exit__(self, *exc: object) -> None:
        device_id_var.reset(self._tokens[2])
        caller_var.reset(self._tokens[1])
        request_id_var.reset(self._tokens[0])
