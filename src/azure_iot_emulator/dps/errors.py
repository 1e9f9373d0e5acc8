"""DPS errors with Azure's HTTP status and six-digit error codes, and its error body."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any


class DpsError(Exception):
    def __init__(self, status: int, code: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        """Seconds, on a 429 only (azure-core retries any error carrying Retry-After)."""

    def body(self, now: datetime) -> dict[str, Any]:
        return {
            "errorCode": self.code,
            "trackingId": str(uuid.uuid4()),
            "message": self.message,
            "timestampUtc": azure_time(now),
            "info": {},
        }


def bad_request(message: str, code: int = 400004) -> DpsError:
    return DpsError(400, code, message)


def not_found(message: str) -> DpsError:
    return DpsError(404, 404201, message)


def conflict(message: str) -> DpsError:
    return DpsError(409, 409201, message)


def precondition_failed(message: str = "ETag mismatch") -> DpsError:
    return DpsError(412, 412002, message)


def unauthorized(message: str = "Unauthorized") -> DpsError:
    return DpsError(401, 401002, message)


def throttled(what: str, retry_after: int) -> DpsError:
    message = f"Throttled: {what} quota exceeded, retry after {retry_after} s"
    return DpsError(429, 429001, message, retry_after)


def azure_time(moment: datetime) -> str:
    """``2024-05-01T10:11:12.1234567Z`` (seven fractional digits, UTC)."""
    m = moment.astimezone(UTC)  # formatted by hand: strftime costs three times as much
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}."
        f"{m.microsecond:06d}0Z"
    )
