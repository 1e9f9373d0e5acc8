"""Who may call what: the suite's one table of RPC -> roles, deny by default.

The gRPC server (``provkit.grpc_server``) resolves the caller from the client certificate
(``provkit.parties``) and checks this table before any servicer code runs.  A method that is not in the
table is refused for every role, so a new RPC stays closed until someone decides who may call it.
Health and reflection (``OPEN_SERVICES``) are open to any caller that passed the TLS handshake: readiness
probes use them, and they reveal only service names, serving state and the (public) schema.

A refusal is ``CallerNotAuthorized``: PERMISSION_DENIED, reason ``CALLER_NOT_AUTHORIZED``, naming the role
seen (``ErrorInfo.metadata``: ``role``, ``method``).  Ownership of a device (which OEM may act on it) is not
decided here but in the domain, where the data is.

API: ``AccessPolicy(rules)``; ``.roles_for(method) -> frozenset[Role]``; ``.check(method, caller)``
(raises ``CallerNotAuthorized``); ``.markdown() -> str`` (the table as docs/parties.md shows it);
``SUITE_POLICY``; ``is_open(method)``; ``Refusal`` (what a refused call leaves in an audit, or the summary
of its repeats) and the ``RefusalLog`` protocol a service's audit store implements
(``async record_refusal(refusal)``); the services put ``provkit.refusal_audit.RefusalAggregator`` in front
of it, so that a flood of refusals is written as a first row and a count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from provkit.context import Caller, Role
from provkit.errors import PermissionDenied, Reason

OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.")

_FACTORY = "/devprov.v1.FactoryService/"
_ACTIVATION = "/devprov.v1.ActivationService/"


class CallerNotAuthorized(PermissionDenied):
    def __init__(self, method: str, caller: Caller) -> None:
        super().__init__(
            Reason.CALLER_NOT_AUTHORIZED,
            f"a caller with role {caller.role.value!r} may not call {method}",
            metadata={"role": caller.role.value, "method": method},
        )


def is_open(method: str) -> bool:
    return method.lstrip("/").startswith(OPEN_SERVICES)


@dataclass(frozen=True)
class AccessPolicy:
    rules: Mapping[str, frozenset[Role]]  # "/package.Service/Method" -> roles allowed

    def roles_for(self, method: str) -> frozenset[Role]:
        return self.rules.get(method, frozenset())

    def check(self, method: str, caller: Caller) -> None:
        if caller.role not in self.roles_for(method):
            raise CallerNotAuthorized(method, caller)

    def markdown(self) -> str:
        lines = ["| RPC | roles allowed |", "| --- | --- |"]
        for method, roles in self.rules.items():
            allowed = ", ".join(f"`{r.value}`" for r in Role if r in roles)
            lines.append(f"| `{method.lstrip('/')}` | {allowed} |")
        return "\n".join(lines)


SUITE_POLICY = AccessPolicy(
    {
        # the factory: the MES and the test bench (`device-client provision`) mint, enroll and follow up
        _FACTORY + "MintCertificate": frozenset({Role.FACTORY}),
        _FACTORY + "MintCertificates": frozenset({Role.FACTORY}),  # production lots
        _FACTORY + "Enroll": frozenset({Role.FACTORY}),
        _FACTORY + "EnrollBatch": frozenset({Role.FACTORY}),
        _FACTORY + "GetEnrollmentStatus": frozenset({Role.FACTORY, Role.OPERATOR}),
        # who owns a device not yet activated is the factory's (the seller's) decision
        _FACTORY + "TransferOwnership": frozenset({Role.FACTORY}),
        # activation codes: a new one for a lost label; the MES confirms printed labels (codes forgotten)
        _FACTORY + "RotateActivationCode": frozenset({Role.FACTORY}),
        _FACTORY + "AcknowledgeActivationCodes": frozenset({Role.FACTORY}),
        # revocation (a leaked key, a scrapped board): the factory, which holds the issuing CA
        _FACTORY + "RevokeCertificate": frozenset({Role.FACTORY}),
        # read-only inventory of issued certificates: the factory and the operator (no secrets in it)
        _FACTORY + "ListCertificates": frozenset({Role.FACTORY, Role.OPERATOR}),
        _FACTORY + "GetCertificate": frozenset({Role.FACTORY, Role.OPERATOR}),
        # the OEM's back office and the portal acting for an OEM
        _ACTIVATION + "Activate": frozenset({Role.OEM, Role.PORTAL}),
        _ACTIVATION + "Deactivate": frozenset({Role.OEM, Role.PORTAL}),
        _ACTIVATION + "GetDeviceStatus": frozenset({Role.OEM, Role.PORTAL}),
        _ACTIVATION + "GetMetadataTemplate": frozenset({Role.OEM, Role.PORTAL}),  # its own OEM's only
    }
)


# The reason of the summary of refusals whose kinds found no room of their own (``provkit.refusal_audit``).
KINDS_OVER_CAP = "REFUSAL_KINDS_OVER_CAP"


@dataclass(frozen=True)
class Refusal:
    """One call refused before the servicer ran (no identity, or a role the table does not allow), or the
    summary of ``repeats`` more of its kind between ``time`` and ``until`` (``provkit.refusal_audit``)."""

    time: datetime
    method: str
    caller: str  # str(Caller), or the certificate's CN and thumbprint when it named no party
    role: str  # the role seen ("" when none was recognised)
    device_id: str  # the request's device_id field when it has one, else ""
    request_id: str
    reason: str
    # who, for telling kinds apart: the certificate's CN and thumbprint, else the peer without its port
    # ("" : ``caller``); not stored
    source: str = ""
    repeats: int = 0  # a summary: how many more refusals like this one (0: this refusal alone)
    until: datetime | None = None  # a summary: the time of the last of them (``time``: the first)

    @property
    def repeats_note(self) -> str:
        """A summary's "and 1,234 more like this between T1 and T2" ("" for one refusal)."""
        if not self.repeats:
            return ""
        what = "of other kinds" if self.reason == KINDS_OVER_CAP else "like this"
        until = self.until or self.time
        return (
            f"and {self.repeats:,} more {what} between {self.time.isoformat(timespec='milliseconds')} "
            f"and {until.isoformat(timespec='milliseconds')}"
        )

    @property
    def detail(self) -> str:
        detail = f"{self.reason} role={self.role or '-'} method={self.method or '-'}"
        return f"{detail} {self.repeats_note}" if self.repeats else detail


class RefusalLog(Protocol):
    """Where a service audits refusals (activation_svc: its audit log; factory_svc: its ledger)."""

    async def record_refusal(self, refusal: Refusal) -> None: ...
