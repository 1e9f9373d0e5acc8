"""Device metadata: the seed's ``{"tags": {...}, "properties": {"desired": {...}}}``, checked against Azure's
twin rules before anything is written.

Rules (Azure IoT Hub device twins): tags <= 8 KB and desired properties <= 32 KB (compact UTF-8 JSON);
objects nested at most 5 levels below ``tags`` / ``desired``; keys non-empty, at most 1 KB (UTF-8),
without ``$``, ``.``, spaces or control characters; values are JSON (strings <= 4 KB, finite numbers,
booleans, objects, arrays); ``null`` is refused (in a twin patch it would mean "delete").

``parse_metadata(text, field="metadata_json") -> TwinMetadata`` raises ``InvalidArgument``
(reason METADATA_INVALID, or METADATA_NOT_JSON) carrying one field violation per problem found.  The text is
parsed by ``jsonsafe``: what it refuses is METADATA_NOT_JSON when the text is not JSON at all (syntax,
``NaN``), else METADATA_INVALID (nesting past 64 levels, a lone surrogate, a number beyond a double, a
duplicate key); either carries ErrorInfo metadata ``json_problem`` = jsonsafe's reason (e.g. TOO_DEEP).

What an Activate asks for (``requested_metadata(text, clear)``): no metadata (an empty or blank text) KEEPS
the device's metadata; metadata REPLACES it; ``clear`` (and no metadata: both is InvalidArgument
METADATA_CONFLICT) CLEARS it.  ``target_twin(request, current)`` is the initial twin the enrollment must hold
then; metadata without tags and desired properties would clear a device that has some, and is refused
(FailedPrecondition METADATA_EMPTY): clearing is never a side effect, it is asked for.
``sample_metadata(index=0, interval_s=5.0)`` an OEM's metadata for its ``index``-th machine: the one sample
``make up``'s sample-metadata.json and the demo's fleet show (the portal pre-fills nothing).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonsafe
from activation_svc.errors import Reason
from activation_svc.model import MetadataChange
from provkit.cloud import InitialTwin
from provkit.errors import FailedPrecondition, FieldViolation, InvalidArgument

MAX_TAGS_BYTES = 8 * 1024
MAX_DESIRED_BYTES = 32 * 1024
MAX_DEPTH = 5
MAX_KEY_BYTES = 1024
MAX_STRING_BYTES = 4 * 1024
MAX_VIOLATIONS = 20


@dataclass(frozen=True)
class TwinMetadata:
    tags: Mapping[str, Any]
    desired: Mapping[str, Any]

    def initial_twin(self) -> dict[str, Any]:
        return {"tags": dict(self.tags), "properties": {"desired": dict(self.desired)}}

    def canonical(self) -> str:
        return json.dumps(self.initial_twin(), sort_keys=True, separators=(",", ":"))


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _key_problem(key: str) -> str | None:
    if not key:
        return "keys must not be empty"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"keys are at most {MAX_KEY_BYTES} bytes"
    if "$" in key:
        return "keys must not contain '$'"
    if "." in key:
        return "keys must not contain '.'"
    if " " in key:
        return "keys must not contain spaces"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "keys must not contain control characters"
    return None


def _check(value: Any, path: str, depth: int, out: list[FieldViolation]) -> None:
    if len(out) >= MAX_VIOLATIONS:
        return
    if isinstance(value, dict):
        if depth > MAX_DEPTH:
            out.append(FieldViolation(path, f"objects may be nested at most {MAX_DEPTH} levels deep"))
            return
        for key, item in value.items():
            problem = _key_problem(key)
            child = f"{path}.{key}"
            if problem:
                out.append(FieldViolation(child, problem))
                continue
            _check(item, child, depth + 1, out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]", depth, out)
    elif value is None:
        out.append(FieldViolation(path, "null is not allowed (in a twin it deletes the property)"))
    elif isinstance(value, bool):
        return
    elif isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            out.append(FieldViolation(path, "numbers must be finite"))
    elif isinstance(value, str):
        if len(value.encode("utf-8")) > MAX_STRING_BYTES:
            out.append(FieldViolation(path, f"strings are at most {MAX_STRING_BYTES} bytes"))
    else:
        out.append(FieldViolation(path, f"not a JSON value ({type(value).__name__})"))


def validate_metadata(data: Any, field: str = "metadata_json") -> TwinMetadata:
    violations: list[FieldViolation] = []
    if not isinstance(data, dict):
        raise InvalidArgument(
            Reason.METADATA_INVALID,
            'the metadata must be a JSON object {"tags": {...}, "properties": {"desired": {...}}}',
            field_violations=[FieldViolation(field, "must be a JSON object")],
        )
    for key in data:
        if key not in ("tags", "properties"):
            violations.append(FieldViolation(f"{field}.{key}", "only 'tags' and 'properties' are allowed"))
    tags = data.get("tags", {})
    properties = data.get("properties", {})
    desired: Any = {}
    if not isinstance(tags, dict):
        violations.append(FieldViolation(f"{field}.tags", "must be a JSON object"))
        tags = {}
    if not isinstance(properties, dict):
        violations.append(FieldViolation(f"{field}.properties", "must be a JSON object"))
    else:
        for key in properties:
            if key != "desired":
                violations.append(
                    FieldViolation(f"{field}.properties.{key}", "only desired properties can be set")
                )
        desired = properties.get("desired", {})
        if not isinstance(desired, dict):
            violations.append(FieldViolation(f"{field}.properties.desired", "must be a JSON object"))
            desired = {}
    _check(tags, f"{field}.tags", 1, violations)
    _check(desired, f"{field}.properties.desired", 1, violations)
    if _size(tags) > MAX_TAGS_BYTES:
        violations.append(
            FieldViolation(
                f"{field}.tags", f"tags are {_size(tags)} bytes; at most {MAX_TAGS_BYTES} are allowed"
            )
        )
    if _size(desired) > MAX_DESIRED_BYTES:
        violations.append(
            FieldViolation(
                f"{field}.properties.desired",
                f"desired properties are {_size(desired)} bytes; at most {MAX_DESIRED_BYTES} are allowed",
            )
        )
    if violations:
        raise InvalidArgument(
            Reason.METADATA_INVALID,
            f"the metadata breaks {len(violations)} twin rule(s); first: "
            f"{violations[0].field}: {violations[0].description}",
            metadata={"violations": str(len(violations))},
            field_violations=violations,
        )
    return TwinMetadata(tags, desired)


def parse_metadata(text: str, field: str = "metadata_json") -> TwinMetadata:
    if not text.strip():
        return TwinMetadata({}, {})
    try:
        data = jsonsafe.loads(text)
    except jsonsafe.JsonRefused as exc:
        raise InvalidArgument(
            Reason.METADATA_NOT_JSON if exc.syntax else Reason.METADATA_INVALID,
            f"the metadata is refused: {exc}",
            metadata={"json_problem": exc.reason, **({} if exc.syntax else {"violations": "1"})},
            field_violations=[FieldViolation(field, str(exc))],
        ) from None
    return validate_metadata(data, field)


@dataclass(frozen=True)
class MetadataRequest:
    """What an activation asks to do with the device's metadata."""

    change: MetadataChange
    metadata: TwinMetadata | None = None  # the metadata sent (REPLACED only)

    def fingerprint(self) -> str:
        """The request's metadata for its idempotency fingerprint (a replacement: its canonical JSON)."""
        return self.metadata.canonical() if self.metadata is not None else self.change.value

    def summary(self) -> str:
        """For the audit detail: the metadata's SHA-256 (never its values), or what happens to it."""
        if self.metadata is None:
            return f"metadata={self.change.value}"
        return f"metadata_sha256={hashlib.sha256(self.metadata.canonical().encode()).hexdigest()}"


def requested_metadata(
    text: str, clear: bool, field: str = "metadata_json", clear_field: str = "clear_metadata"
) -> MetadataRequest:
    """KEPT without metadata, REPLACED with it, CLEARED with ``clear`` (InvalidArgument with both)."""
    given = bool(text.strip())
    if clear and given:
        raise InvalidArgument(
            Reason.METADATA_CONFLICT,
            "clear_metadata removes the device's metadata: send it without metadata",
            field_violations=[FieldViolation(clear_field, "set together with metadata; send one of them")],
        )
    if clear:
        return MetadataRequest(MetadataChange.CLEARED)
    if not given:
        return MetadataRequest(MetadataChange.KEPT)
    return MetadataRequest(MetadataChange.REPLACED, parse_metadata(text, field))


def target_twin(request: MetadataRequest, current: InitialTwin | None) -> InitialTwin:
    """The initial twin the device's enrollment must hold after the activation (``current``: now)."""
    now = current or InitialTwin()
    if request.change is MetadataChange.KEPT:
        return InitialTwin(dict(now.tags), dict(now.desired))
    if request.change is MetadataChange.CLEARED or request.metadata is None:
        return InitialTwin()
    wanted = InitialTwin(dict(request.metadata.tags), dict(request.metadata.desired))
    if not (wanted.tags or wanted.desired) and (now.tags or now.desired):
        raise FailedPrecondition(
            Reason.METADATA_EMPTY,
            "the metadata has no tags and no desired properties: it would remove the device's; send no "
            "metadata to keep them, or set clear_metadata to remove them",
        )
    return wanted


SAMPLE_SITES = (
    ("Hamburg", "hall 3"),
    ("Lyon", "line B"),
    ("Turin", "press shop"),
    ("Gdansk", "dock 2"),
    ("Porto", "bottling"),
)


def sample_metadata(index: int = 0, interval_s: float = 5.0) -> dict[str, Any]:
    city, spot = SAMPLE_SITES[index % len(SAMPLE_SITES)]
    return {
        "tags": {
            "oem": "Acme Vending",
            "machineModel": "VX-200",
            "chassisNumber": f"VX200-{2026_0000 + index + 1}",
            "location": {"city": city, "spot": spot},
        },
        "properties": {"desired": {"telemetryIntervalSeconds": interval_s, "site": city}},
    }
