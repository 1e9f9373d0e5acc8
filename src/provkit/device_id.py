"""The device id policy, in one place: which ids the CLIs and both services accept.

A device's id is its hardware GUID, printed on its label; it is also its DPS registration id, its IoT Hub
device id and its certificate's common name.

Policies (the ``device_ids`` setting of every program: ``FACTORY_DEVICE_IDS``, ``ACTIVATION_DEVICE_IDS``,
``FACTORY_CLIENT_DEVICE_IDS``, ``ACTIVATION_CLIENT_DEVICE_IDS``, ``DEVICE_CLIENT_DEVICE_IDS``):

``guid`` (default)
    The canonical GUID form the labels carry: 32 hexadecimal digits in groups of 8-4-4-4-12 separated by
    hyphens, no braces.  Case-insensitive; the id is stored in lower case.  A typo or a truncated GUID is
    refused instead of becoming a new device.
``registration-id``
    DPS's rules for the registration id of an X.509 enrollment, for fleets whose ids are not GUIDs: lower
    case alphanumerics and ``- . _ :``, ending in an alphanumeric or ``-``, at most 64 characters (DPS
    allows 128 for a registration id, but the certificate's common name must equal it and a common name
    has at most 64).  Input is lower-cased first, as DPS treats ids case-insensitively.

API
---
``DeviceIdPolicy``  the two policies (``GUID``, ``REGISTRATION_ID``); ``DeviceIdPolicy.parse(text)``.
``check_device_id(raw, policy=DeviceIdPolicy.GUID, field="device_id") -> str``
    The normalised id, or ``InvalidArgument`` with a stable reason and one field violation.
``normalise_device_id(raw, field="device_id") -> str``  the same under the ``registration-id`` rules: the
    floor every id must meet whatever the policy (the domains' own check).
``is_valid_device_id(raw, policy=...) -> bool``
"""

from __future__ import annotations

import enum
import re

from provkit.errors import InvalidArgument, Reason, invalid_field

MAX_LENGTH = 64
GUID_EXAMPLE = "3f2a9c1e-0000-4000-8000-000000000001"
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_ALLOWED_CHAR = re.compile(r"[a-z0-9\-._:]")
_REGISTRATION_ID = re.compile(r"[a-z0-9\-._:]*[a-z0-9\-]")  # every rule below at once (the common case)


class DeviceIdPolicy(enum.StrEnum):
    GUID = "guid"
    REGISTRATION_ID = "registration-id"

    @classmethod
    def parse(cls, text: str) -> DeviceIdPolicy:
        try:
            return cls(text.strip().lower())
        except ValueError:
            choices = " or ".join(repr(p.value) for p in cls)
            raise ValueError(f"device id policy {text!r} is unknown; use {choices}") from None


def _shown(raw: str) -> str:
    """The input as the person typed it, quoted, and not a screenful of it."""
    return repr(raw if len(raw) <= 72 else raw[:72] + "…")


def _registration_id(device_id: str, raw: str, field: str) -> str:
    if len(device_id) <= MAX_LENGTH and _REGISTRATION_ID.fullmatch(device_id):
        return device_id
    if not device_id:
        raise invalid_field(field, Reason.DEVICE_ID_EMPTY, "the device id is empty")
    if len(device_id) > MAX_LENGTH:
        raise invalid_field(
            field,
            Reason.DEVICE_ID_TOO_LONG,
            f"the device id has {len(device_id)} characters; at most {MAX_LENGTH} are allowed",
            length=str(len(device_id)),
        )
    bad = sorted({c for c in device_id if not _ALLOWED_CHAR.fullmatch(c)})
    if bad:
        raise invalid_field(
            field,
            Reason.DEVICE_ID_INVALID_CHARACTERS,
            f"the device id {_shown(raw)} may contain only letters, digits and - . _ : "
            f"(found {''.join(bad)!r})",
        )
    if not (device_id[-1].isalnum() or device_id[-1] == "-"):
        raise invalid_field(
            field,
            Reason.DEVICE_ID_INVALID_LAST_CHARACTER,
            f"the device id {_shown(raw)} must end with a letter, a digit or '-'",
        )
    return device_id


def check_device_id(raw: str, policy: DeviceIdPolicy = DeviceIdPolicy.GUID, field: str = "device_id") -> str:
    device_id = raw.strip().lower()
    if policy is DeviceIdPolicy.REGISTRATION_ID:
        return _registration_id(device_id, raw, field)
    if not device_id:
        raise invalid_field(field, Reason.DEVICE_ID_EMPTY, "the device id is empty")
    if not _GUID.match(device_id):
        raise invalid_field(
            field,
            Reason.DEVICE_ID_NOT_A_GUID,
            f"the device id {_shown(raw)} is not a GUID: expected 32 hex digits as 8-4-4-4-12, "
            f"like {GUID_EXAMPLE}",
        )
    return device_id


def normalise_device_id(raw: str, field: str = "device_id") -> str:
    return check_device_id(raw, DeviceIdPolicy.REGISTRATION_ID, field)


def is_valid_device_id(raw: str, policy: DeviceIdPolicy = DeviceIdPolicy.REGISTRATION_ID) -> bool:
    try:
        check_device_id(raw, policy)
    except InvalidArgument:
        return False
    return True
