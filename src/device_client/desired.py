"""Desired properties: merge, apply, and acknowledge as reported properties.

Acknowledgements follow the IoT Plug and Play writable-property convention: for every desired key the
device reports ``{"value": <applied value>, "ac": <status code>, "av": <desired $version>, "ad": <text>}``
(``ac`` 200 applied, 400 rejected).  ``telemetryIntervalSeconds`` changes the telemetry interval; every
other key is metadata for the machine (e.g. the OEM's initial twin) and is stored and acknowledged as is.
A key deleted from the desired document (``null`` in a patch) is deleted from the reported side too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

TELEMETRY_INTERVAL_KEY = "telemetryIntervalSeconds"
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 86_400.0


@dataclass(frozen=True)
class DesiredOutcome:
    version: int
    properties: dict[str, Any]  # the full applied desired document, without $-keys
    interval_s: float | None  # the interval asked for, or None when the device default applies
    reported_patch: dict[str, Any]


def strip_meta(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in doc.items() if not k.startswith("$")}


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch (RFC 7396), as the hub applies desired patches: null deletes, objects merge."""
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_patch(result[key], value)
        else:
            result[key] = copy.deepcopy(value) if not isinstance(value, dict) else merge_patch({}, value)
    return result


def parse_interval(value: Any) -> tuple[float | None, str | None]:
    """(interval, None) when acceptable, else (None, reason)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, "telemetryIntervalSeconds must be a number"
    if not MIN_INTERVAL_S <= float(value) <= MAX_INTERVAL_S:
        return None, f"telemetryIntervalSeconds must be between {MIN_INTERVAL_S} and {MAX_INTERVAL_S:g}"
    return float(value), None


def _ack(value: Any, code: int, version: int, text: str) -> dict[str, Any]:
    return {"value": value, "ac": code, "av": version, "ad": text}


def _apply(
    properties: dict[str, Any],
    keys: set[str],
    version: int,
    deleted: set[str],
    current_interval: float | None,
) -> DesiredOutcome:
    reported: dict[str, Any] = {}
    interval = current_interval
    for key in sorted(keys):
        if key in deleted:
            reported[key] = None
            if key == TELEMETRY_INTERVAL_KEY:
                interval = None
            continue
        value = properties[key]
        if key == TELEMETRY_INTERVAL_KEY:
            parsed, problem = parse_interval(value)
            if problem is not None:
                reported[key] = _ack(interval, 400, version, problem)
                continue
            interval = parsed
            reported[key] = _ack(parsed, 200, version, "applied")
        else:
            reported[key] = _ack(value, 200, version, "stored")
    return DesiredOutcome(
        version=version, properties=properties, interval_s=interval, reported_patch=reported
    )


def apply_document(desired: dict[str, Any], current_interval: float | None) -> DesiredOutcome:
    """A full desired document (from a twin GET): apply and acknowledge every key."""
    version = int(desired.get("$version", 0))
    properties = strip_meta(desired)
    outcome = _apply(properties, set(properties), version, set(), None)
    if TELEMETRY_INTERVAL_KEY not in properties:
        return outcome
    if outcome.interval_s is None:  # rejected: keep what we had
        return DesiredOutcome(version, properties, current_interval, outcome.reported_patch)
    return outcome


def apply_patch(
    current: dict[str, Any], patch: dict[str, Any], current_interval: float | None
) -> DesiredOutcome:
    """A desired patch pushed by the hub: merge into ``current`` and acknowledge the touched keys."""
    version = int(patch.get("$version", 0))
    body = strip_meta(patch)
    merged = merge_patch(current, body)
    deleted = {k for k, v in body.items() if v is None}
    return _apply(merged, set(body), version, deleted, current_interval)
