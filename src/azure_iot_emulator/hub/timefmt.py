"""Azure's timestamp format: ISO-8601 UTC with seven fractional digits and a ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime

NEVER = "0001-01-01T00:00:00Z"


def azure_time(moment: datetime) -> str:
    """``2024-05-01T10:11:12.1234560Z`` (what the service SDKs deserialise)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime")
    u = moment.astimezone(UTC)
    # Formatted by hand: strftime re-checks the local time zone (a stat of /etc/localtime) on every
    # call, which showed up in profiles of connect and disconnect storms.
    return (
        f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}."
        f"{u.microsecond:06d}0Z"
    )
