"""The device twin document model (pure: no I/O, no clock of its own).

A twin has ``tags`` (service-only, no metadata), ``properties.desired`` (written by the service) and
``properties.reported`` (written by the device).  Each property section carries a ``$version`` that
grows by one per accepted patch, and a ``$metadata`` tree that mirrors the properties: every node has
``$lastUpdated`` (and, for desired properties, ``$lastUpdatedVersion``).  The twin as a whole has a
``version`` that grows on every change of tags, desired or reported properties.

Patches are JSON merge patches: ``null`` deletes a key, objects merge recursively, anything else
replaces.  Azure's limits are enforced on the patch (keys, depth) and on the merged result (size), so a
rejected patch changes nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

# Azure IoT Hub twin limits (documented quotas).
TAGS_MAX_BYTES = 8 * 1024
DESIRED_MAX_BYTES = 32 * 1024
REPORTED_MAX_BYTES = 32 * 1024
MAX_DEPTH = 5  # levels of property keys below the section root: {"l1": {"l2": {"l3": {"l4": {"l5": 1}}}}}
KEY_MAX_BYTES = 1024
STRING_VALUE_MAX_BYTES = 4 * 1024

_FORBIDDEN_KEY_CHARS = frozenset(".$ ")


class TwinError(ValueError):
    """A twin write Azure would refuse; ``reason`` is stable, the message says what is wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Section:
    """``properties.desired`` or ``properties.reported``."""

    props: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = 1

    def document(self) -> dict[str, Any]:
        doc = copy.deepcopy(self.props)
        doc["$metadata"] = copy.deepcopy(self.metadata)
        doc["$version"] = self.version
        return doc


@dataclass(frozen=True)
class Twin:
    tags: dict[str, Any] = field(default_factory=dict)
    desired: Section = field(default_factory=Section)
    reported: Section = field(default_factory=Section)
    version: int = 1


def new_twin(stamp: str) -> Twin:
    """An empty twin, as Azure creates it with a device (both sections at ``$version`` 1)."""
    return Twin(
        tags={},
        desired=Section({}, {"$lastUpdated": stamp, "$lastUpdatedVersion": 1}, 1),
        reported=Section({}, {"$lastUpdated": stamp}, 1),
        version=1,
    )


# ----------------------------------------------------------------------------------------------------------
# validation


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _check_key(key: Any, path: str) -> None:
    if not isinstance(key, str) or not key:
        raise TwinError("INVALID_KEY", f"empty or non-string property name at {path or 'root'}")
    if len(key.encode("utf-8")) > KEY_MAX_BYTES:
        raise TwinError("INVALID_KEY", f"property name longer than {KEY_MAX_BYTES} bytes at {path or 'root'}")
    for ch in key:
        code = ord(ch)
        if ch in _FORBIDDEN_KEY_CHARS or code < 0x20 or 0x7F <= code <= 0x9F:
            raise TwinError(
                "INVALID_KEY",
                f"property name {key!r} contains a character Azure forbids ('.', '$', ' ', control)",
            )


def _check_value(value: Any, path: str, depth: int) -> None:
    if isinstance(value, dict):
        if depth > MAX_DEPTH:
            raise TwinError("DEPTH_EXCEEDED", f"nesting deeper than {MAX_DEPTH} levels at {path}")
        for key, child in value.items():
            _check_key(key, path)
            _check_value(child, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            if child is None:
                continue
            _check_value(child, f"{path}[{index}]", depth + 1 if isinstance(child, dict | list) else depth)
    elif isinstance(value, str):
        if len(value.encode("utf-8")) > STRING_VALUE_MAX_BYTES:
            raise TwinError(
                "VALUE_TOO_LONG", f"string value longer than {STRING_VALUE_MAX_BYTES} bytes at {path}"
            )
    elif value is None or isinstance(value, bool | int | float):
        return
    else:  # pragma: no cover - json.loads never produces other types
        raise TwinError("INVALID_VALUE", f"unsupported value at {path}")


def validate_patch(patch: Any, *, what: str) -> dict[str, Any]:
    """Check a patch (or a full replacement) for ``what`` ("tags", "desired", "reported")."""
    if not isinstance(patch, dict):
        raise TwinError("NOT_AN_OBJECT", f"{what} must be a JSON object")
    for key, value in patch.items():
        _check_key(key, "")
        _check_value(value, key, 2 if isinstance(value, dict) else 1)
    return patch


_READ_ONLY_KEYS = frozenset(("$metadata", "$version"))


def strip_service_readonly(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """Drop the read-only ``$metadata`` and ``$version`` from the root of a service-sent section, as the
    service SDK sends back whatever it fetched; any other ``$`` name is left for validation to refuse."""
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise TwinError("NOT_AN_OBJECT", "twin section must be a JSON object")
    return {key: value for key, value in section.items() if key not in _READ_ONLY_KEYS}


# ----------------------------------------------------------------------------------------------------------
# merge


def _merge(
    props: dict[str, Any], meta: dict[str, Any], patch: Mapping[str, Any], stamp: dict[str, Any]
) -> None:
    for key, value in patch.items():
        if value is None:
            props.pop(key, None)
            meta.pop(key, None)
        elif isinstance(value, dict):
            current = props.get(key)
            child_meta = meta.get(key)
            if not isinstance(current, dict):
                current, child_meta = {}, {}
            if not isinstance(child_meta, dict):
                child_meta = {}
            _merge(current, child_meta, value, stamp)
            child_meta.update(stamp)
            props[key] = current
            meta[key] = child_meta
        else:
            props[key] = copy.deepcopy(value)
            meta[key] = dict(stamp)


def _limit_for(what: str) -> int:
    return {"tags": TAGS_MAX_BYTES, "desired": DESIRED_MAX_BYTES, "reported": REPORTED_MAX_BYTES}[what]


def _check_size(props: dict[str, Any], what: str) -> None:
    limit = _limit_for(what)
    if _json_size(props) > limit:
        raise TwinError("TWIN_TOO_LARGE", f"{what} would exceed {limit} bytes")


def patch_section(
    section: Section, patch: Mapping[str, Any], *, what: str, timestamp: str, replace_all: bool = False
) -> Section:
    """A new section with ``patch`` merged (or, with ``replace_all``, replacing everything) and
    ``$version`` + 1.  ``what`` is "desired" or "reported"."""
    validate_patch(patch, what=what)
    version = section.version + 1
    stamp: dict[str, Any] = {"$lastUpdated": timestamp}
    if what == "desired":
        stamp["$lastUpdatedVersion"] = version
    if replace_all:
        props: dict[str, Any] = {}
        meta: dict[str, Any] = {}
    else:
        props = copy.deepcopy(section.props)
        meta = {k: v for k, v in copy.deepcopy(section.metadata).items() if not k.startswith("$")}
    _merge(props, meta, patch, stamp)
    _check_size(props, what)
    meta.update(stamp)
    return Section(props, meta, version)


def patch_tags(
    tags: Mapping[str, Any], patch: Mapping[str, Any], *, replace_all: bool = False
) -> dict[str, Any]:
    validate_patch(patch, what="tags")
    merged: dict[str, Any] = {} if replace_all else copy.deepcopy(dict(tags))
    _merge(merged, {}, patch, {})
    _check_size(merged, "tags")
    return merged


def apply_service_update(
    twin: Twin,
    *,
    tags: Mapping[str, Any] | None,
    desired: Mapping[str, Any] | None,
    timestamp: str,
    replace_all: bool = False,
) -> tuple[Twin, dict[str, Any] | None]:
    """The service's twin PATCH (merge) or PUT (``replace_all``).  Returns the new twin and the desired
    delta to push to the device (``None`` when desired properties did not change)."""
    new_tags = twin.tags
    changed = False
    if tags is not None:
        new_tags = patch_tags(twin.tags, tags, replace_all=replace_all)
        changed = changed or new_tags != twin.tags or replace_all
    new_desired = twin.desired
    delta: dict[str, Any] | None = None
    if desired is not None and (desired or replace_all):
        new_desired = patch_section(
            twin.desired, desired, what="desired", timestamp=timestamp, replace_all=replace_all
        )
        delta = copy.deepcopy(dict(desired)) if not replace_all else copy.deepcopy(new_desired.props)
        changed = True
    if not changed:
        return twin, None
    return replace(twin, tags=new_tags, desired=new_desired, version=twin.version + 1), delta


def apply_reported_patch(twin: Twin, patch: Any, *, timestamp: str) -> Twin:
    new_reported = patch_section(twin.reported, patch, what="reported", timestamp=timestamp)
    return replace(twin, reported=new_reported, version=twin.version + 1)


def initial_twin_parts(initial_twin: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tags, desired)`` from a DPS ``initialTwin``
    (``{"tags": {...}, "properties": {"desired": {...}}}``)."""
    if not initial_twin:
        return {}, {}
    if not isinstance(initial_twin, Mapping):
        raise TwinError("NOT_AN_OBJECT", "initialTwin must be a JSON object")
    tags = initial_twin.get("tags") or {}
    properties = initial_twin.get("properties") or {}
    if not isinstance(properties, Mapping):
        raise TwinError("NOT_AN_OBJECT", "initialTwin.properties must be a JSON object")
    desired = strip_service_readonly(properties.get("desired"))
    return strip_service_readonly(tags), desired
