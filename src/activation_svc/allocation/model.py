"""Typed values of the allocation webhook: Azure's AllocationRequest as the domain reads it, the answer,
and the reasons a registration is refused (audited, never told to the device or to DPS).

``allocation_query(body)`` reads the parts of an AllocationRequest the decision needs (the registration id
and the certificate DPS verified, from ``deviceRuntimeContext``; ``linkedHubs``) and raises
``MalformedRequest`` for anything else; what it leaves out is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import auto
from typing import Any

from provkit.errors import ReasonEnum


class AllocationReason(ReasonEnum):
    DEVICE_UNKNOWN = (
        auto(),
        "no record of this registration id (answered as not activated)",
    )
    DEVICE_NOT_ACTIVATED = auto(), "the device is enrolled, nobody has activated it yet"
    DEVICE_REVOKED = auto(), "the factory revoked the device's certificate"
    DEVICE_DEPROVISIONED = auto(), "the OEM deactivated the device"
    REGISTRATION_ID_MISMATCH = (
        auto(),
        "the registration id is not the CN of the certificate DPS verified",
    )
    CERTIFICATE_NOT_ENROLLED = (
        auto(),
        "the certificate DPS verified is not the one recorded for the device",
    )
    HUB_NOT_LINKED = auto(), "the device's hub is not among the request's linked hubs"
    ALLOCATION_REQUEST_MALFORMED = (
        auto(),
        "the body is not an AllocationRequest (not JSON, not application/json, over 64 KiB)",
    )
    FUNCTION_KEY_WRONG = auto(), "the function key (`code`) is missing or wrong"
    REGISTRY_UNAVAILABLE = auto(), "the device registry could not be read (answered 503)"


class MalformedRequest(ValueError):
    pass


@dataclass(frozen=True)
class AllocationQuery:
    """What DPS asks about: the registration id, the verified certificate's subject and SHA-256
    thumbprint, and the hubs it may assign."""

    registration_id: str
    subject_name: str
    sha256_thumbprint: str
    linked_hubs: tuple[str, ...]


@dataclass(frozen=True)
class Allocated:
    """The hub and the initial twin (Azure's AllocationResponse)."""

    hub: str
    tags: Mapping[str, Any] = field(default_factory=dict)
    desired: Mapping[str, Any] = field(default_factory=dict)

    def response(self) -> dict[str, Any]:
        return {
            "iotHubHostName": self.hub,
            "initialTwin": {"tags": dict(self.tags), "properties": {"desired": dict(self.desired)}},
        }


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MalformedRequest(f"{what} is missing or not a string")
    return value.strip()


def allocation_query(body: Any) -> AllocationQuery:
    if not isinstance(body, dict):
        raise MalformedRequest("the body is not a JSON object")
    context = body.get("deviceRuntimeContext")
    if not isinstance(context, dict):
        raise MalformedRequest("deviceRuntimeContext is missing")
    x509 = context.get("x509")
    info = x509.get("certificateInfo") if isinstance(x509, dict) else None
    if not isinstance(info, dict):
        raise MalformedRequest("deviceRuntimeContext.x509.certificateInfo is missing: not an X.509 device")
    hubs = body.get("linkedHubs")
    if not isinstance(hubs, list) or not all(isinstance(h, str) for h in hubs):
        raise MalformedRequest("linkedHubs is missing or not a list of host names")
    return AllocationQuery(
        registration_id=_text(context.get("registrationId"), "deviceRuntimeContext.registrationId"),
        subject_name=_text(info.get("subjectName"), "certificateInfo.subjectName"),
        sha256_thumbprint=_text(info.get("sha256Thumbprint"), "certificateInfo.sha256Thumbprint").upper(),
        linked_hubs=tuple(hubs),
    )


def common_name(subject_name: str) -> str | None:
    """The CN of a subject as DPS writes it (``CN=x, O=y`` or RFC 4514 ``CN=x,O=y``); None without one."""
    for part in subject_name.split(","):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip().upper() == "CN":
            return value.strip()
    return None
