"""The one translation from a failed cloud call (``provkit.cloud.CloudError``) to a domain error.

The adapters raise ``CloudError`` subclasses; the domains decide what a missing record, a taken id or a lost
etag race means for them (those stay ``except`` clauses where the data is).  The two failures every domain
reports the same way are translated here, once:

- ``CloudUnavailable`` -> ``Unavailable`` ``<SERVICE>_UNAVAILABLE``, "<SERVICE> cannot be reached: ...",
  ``RetryInfo`` = the service's ``retry_after`` or 5 s;
- ``CloudRejected`` -> ``FailedPrecondition`` ``<SERVICE>_REFUSED``, "<who> refused <what>: ...".

API
---
``CloudService.DPS`` / ``CloudService.HUB``   which service a call went to (its reasons and its name).
``translating_cloud_errors(service, *, refused="the request", unavailable_note="", refused_metadata=False)``
    a context manager (usable around ``await``) raising the translated error ``from`` the cloud one;
    ``refused`` names what was refused ("the update"), ``unavailable_note`` is appended to the
    unavailable message, ``refused_metadata`` puts the HTTP status into the refusal's metadata.
``cloud_unavailable(exc, service, *, note="")`` / ``cloud_refused(exc, service, *, what="the request",
    with_status=False)``   the two errors, for a call site that decides more before raising.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

from provkit.cloud import CloudError, CloudRejected, CloudUnavailable
from provkit.errors import FailedPrecondition, Reason, Unavailable

DEFAULT_RETRY_AFTER = 5.0  # seconds, when the service named no delay


class CloudService(enum.Enum):
    DPS = (Reason.DPS_UNAVAILABLE, Reason.DPS_REFUSED, "DPS", "DPS")
    HUB = (Reason.HUB_UNAVAILABLE, Reason.HUB_REFUSED, "HUB", "the IoT hub")

    def __init__(self, unavailable: Reason, refused: Reason, short: str, who: str) -> None:
        self.unavailable_reason = unavailable
        self.refused_reason = refused
        self.short = short  # as the unavailable message names it
        self.who = who  # as the refusal names it


def cloud_unavailable(exc: CloudUnavailable, service: CloudService, *, note: str = "") -> Unavailable:
    return Unavailable(
        service.unavailable_reason,
        f"{service.short} cannot be reached: {exc}{note}",
        retry_after=exc.retry_after or DEFAULT_RETRY_AFTER,
    )


def cloud_refused(
    exc: CloudError, service: CloudService, *, what: str = "the request", with_status: bool = False
) -> FailedPrecondition:
    return FailedPrecondition(
        service.refused_reason,
        f"{service.who} refused {what}: {exc}",
        metadata={"status": str(exc.status)} if with_status else None,
    )


@contextlib.contextmanager
def translating_cloud_errors(
    service: CloudService,
    *,
    refused: str = "the request",
    unavailable_note: str = "",
    refused_metadata: bool = False,
) -> Iterator[None]:
    """``CloudUnavailable`` and ``CloudRejected`` leaving the block as the domain's errors."""
    try:
        yield
    except CloudUnavailable as exc:
        raise cloud_unavailable(exc, service, note=unavailable_note) from exc
    except CloudRejected as exc:
        raise cloud_refused(exc, service, what=refused, with_status=refused_metadata) from exc
