"""Azure's timestamp format: ISO-8601 UTC with seven fractional digits and a ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime

NEVER = "0001-01-01T00:00:00Z"


def azure_time(moment: datetime) -> str:
    """``2024-05-01T10:11:12.1234560Z`` (what the service SDKs deserialise)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond:06d}0Z"
