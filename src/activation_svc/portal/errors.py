"""A failed call to the activation service as a person reads it: a title, a sentence, the fields that are
wrong (named as the form names them) and an HTTP status.  Branches on the gRPC code and ErrorInfo.reason
only, never on message text; the service's own message is shown (escaped) under the sentence.

``PortalReason``: the reasons the portal gives itself, before anything reaches the service (shown like the
service's; docs/error-reasons.md's table of reasons is rendered from it).  ``SENTENCES``: what the portal
says for a reason of the service (``activation_svc.errors.Reason``, ``provkit.errors.Reason``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import auto

import grpc

from activation_svc.errors import Reason
from provkit.errors import Reason as SharedReason
from provkit.errors import ReasonEnum
from provkit.grpc_errors import RpcErrorDetails


class PortalReason(ReasonEnum):
    PORTAL_RATE_LIMITED = auto(), "too many wrong activation codes from this address: nothing sent"
    FORM_NOT_UTF8 = auto(), "the form's body was not UTF-8 text: nothing sent"
    SHIPMENT_UNUSABLE = (
        auto(),
        "the shipment CSV cannot be used as a whole (columns, size, text): nothing sent",
    )


# proto field -> (form field name, label)
FIELDS = {
    "device_id": ("device_id", "Device ID"),
    "activation_code": ("activation_code", "Activation code"),
    "metadata_json": ("metadata", "Metadata"),
    "hub": ("hub", "IoT hub"),
    "clear_metadata": ("clear_metadata", "Remove the device's metadata"),
}

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

SENTENCES: dict[str, str] = {
    Reason.ACTIVATION_DENIED: "Unknown device or wrong activation code. Check both against the label.",
    Reason.ACTIVATION_RATE_LIMITED: "Too many failed attempts for this device.",  # the panel says when
    Reason.METADATA_INVALID: "The metadata breaks the device twin rules.",
    Reason.METADATA_TEMPLATE_VIOLATION: "The metadata does not match your company's template.",
    Reason.METADATA_CONFLICT: "Either send metadata or remove the device's metadata, not both.",
    Reason.METADATA_EMPTY: (
        "The metadata is empty: it would remove the device's tags and desired properties. Leave the field "
        'empty to keep them, or tick "Remove the device\'s metadata" to remove them.'
    ),
    Reason.HUB_UNKNOWN: "The chosen IoT hub is not one of the linked hubs.",
    Reason.HUB_NOT_CONFIGURED: "No IoT hub is configured for activation.",
    SharedReason.REQUEST_ID_REUSED: (
        "This form was already sent with different values. Reload the form and send again."
    ),
    SharedReason.ENROLLMENT_CONCURRENTLY_MODIFIED: (
        "The device's enrollment kept changing meanwhile. Try again."
    ),
    Reason.ENROLLMENT_CHANGED_CONCURRENTLY: (
        "Someone else changed this device while you sent the form. Check its status, then send again."
    ),
    Reason.HUB_TWIN_CONCURRENTLY_MODIFIED: "The device's twin kept changing meanwhile. Try again.",
    SharedReason.DPS_UNAVAILABLE: "The provisioning service cannot be reached right now. Try again later.",
    SharedReason.HUB_UNAVAILABLE: "The IoT hub cannot be reached right now. Try again later.",
    SharedReason.DPS_REFUSED: "The provisioning service refused the change.",
    SharedReason.HUB_REFUSED: "The IoT hub refused the change.",
}


# Reasons about one field whose own message (shown next to it) says everything: the page says it there,
# once, and the panel above only points at the field.
FIELD_SAYS_IT = frozenset({Reason.METADATA_NOT_JSON, Reason.ACTIVATION_CODE_MALFORMED})


@dataclass(frozen=True)
class FieldProblem:
    name: str  # the form field ("metadata"), or "" when it names none of them
    label: str  # "Metadata"
    path: str  # where inside it ("tags.a.b"), "" for the field itself
    description: str


@dataclass(frozen=True)
class ServiceProblem:
    title: str
    sentence: str
    code: str  # gRPC status name
    reason: str
    message: str  # the service's own words, shown with the reason when nothing else on the page says more
    fields: tuple[FieldProblem, ...]
    http_status: int
    retry_after: float | None = None

    def field_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields if f.name)


def field_problem(field: str, description: str) -> FieldProblem:
    head, dot, rest = field.partition(".")
    bracket = head.find("[")
    if bracket > 0:
        head, rest = head[:bracket], head[bracket:] + (dot + rest if dot else "")
    if head in FIELDS:
        name, label = FIELDS[head]
        return FieldProblem(name, label, rest, description)
    return FieldProblem("", field, "", description)


def describe(details: RpcErrorDetails, action: str = "Not activated") -> ServiceProblem:
    code = details.code
    reason = details.reason
    if code is grpc.StatusCode.UNAVAILABLE and not reason:
        sentence = "The activation service cannot be reached right now. Try again later."
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        sentence = "The activation service did not answer in time. Try again."
    elif code is grpc.StatusCode.UNAUTHENTICATED:
        sentence = "The portal is not allowed to call the activation service (check its client certificate)."
    elif reason.startswith("DEVICE_ID_"):
        sentence = "The device ID is not valid."
    else:
        sentence = SENTENCES.get(reason, "")
    fields = tuple(field_problem(v.field, v.description) for v in details.field_violations)
    if not fields and reason == Reason.ACTIVATION_DENIED:
        fields = (
            FieldProblem("device_id", "Device ID", "", "check it (an unknown device gets the same answer)"),
            FieldProblem("activation_code", "Activation code", "", "not accepted for this device"),
        )
    if fields and reason in FIELD_SAYS_IT:
        sentence = ""  # said once, next to the field
    # the service's own words only where ours say nothing (they would repeat the sentence or the fields)
    message = details.message if not sentence and not fields else ""
    return ServiceProblem(
        title=action,
        sentence=sentence or ("" if fields else "The activation service refused the request."),
        code=code.name if code is not None else "UNKNOWN",
        reason=reason,
        message=message,
        fields=fields,
        http_status=HTTP_STATUS.get(code, 502),
        retry_after=details.retry_after,
    )
