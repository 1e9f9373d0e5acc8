"""activation_svc's error reasons (``ErrorInfo.reason``; domain ``activation.devprov``).

``Reason``: what only activation raises; what every service raises (device and request ids, the caller,
DPS and the hub unreachable or refusing, records changed concurrently) is ``provkit.errors.Reason``.
The table of reasons in docs/error-reasons.md is rendered from both (``Reason.markdown()``).
"""

from __future__ import annotations

from enum import auto

from provkit.errors import ReasonEnum


class Reason(ReasonEnum):
    ACTIVATION_DENIED = auto(), "unknown device, wrong activation code or another OEM's device (one answer)"
    ACTIVATION_RATE_LIMITED = auto(), "too many wrong codes for this device from this caller: retry later"
    ACTIVATION_CODE_MALFORMED = (
        auto(),
        "not an activation code (16 letters and digits of its alphabet): refused unread, never counted",
    )
    METADATA_NOT_JSON = auto(), "the metadata is not JSON (metadata `json_problem` says why)"
    METADATA_INVALID = auto(), "the metadata breaks the device twin rules (one field violation per problem)"
    METADATA_CONFLICT = auto(), "metadata and clear_metadata sent together"
    METADATA_TEMPLATE_VIOLATION = (
        auto(),
        "the metadata does not match the OEM's template (one field violation per problem; metadata `field`)",
    )
    METADATA_EMPTY = auto(), "metadata without tags or desired properties would remove the device's"
    HUB_UNKNOWN = auto(), "the requested hub is not one of the linked hubs"
    HUB_NOT_CONFIGURED = auto(), "no hub requested and no default hub configured"
    ENROLLMENT_CHANGED_CONCURRENTLY = (
        auto(),
        "the enrollment changed since this call read it (metadata `enrollment_etag`): read, then call again",
    )
    HUB_TWIN_CONCURRENTLY_MODIFIED = auto(), "the hub twin kept changing meanwhile: call again"
