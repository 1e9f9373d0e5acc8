"""The device id: hardware GUID = DPS registration id = IoT Hub device id.

DPS's rules for X.509 registration ids: 1-64 characters; lowercase alphanumerics and ``- . _ :``; the last
character alphanumeric or ``-``.  Input is normalised to lowercase first.
"""

from __future__ import annotations

import re

from factory_svc.errors import InvalidArgument, invalid_field

MAX_LENGTH = 64
_ALLOWED = re.compile(r"^[a-z0-9\-._:]+$")


def normalise_device_id(raw: str, field: str = "device_id") -> str:
    device_id = raw.strip().lower()
    if not device_id:
        raise invalid_field(field, "DEVICE_ID_EMPTY", "the device id is empty")
    if len(device_id) > MAX_LENGTH:
        raise invalid_field(
            field,
            "DEVICE_ID_TOO_LONG",
            f"the device id has {len(device_id)} characters; at most {MAX_LENGTH} are allowed",
            length=str(len(device_id)),
        )
    if not _ALLOWED.match(device_id):
        bad = sorted({c for c in device_id if not re.match(r"[a-z0-9\-._:]", c)})
        raise invalid_field(
            field,
            "DEVICE_ID_INVALID_CHARACTERS",
            f"the device id may contain only letters, digits and - . _ : (found {''.join(bad)!r})",
        )
    if not (device_id[-1].isalnum() or device_id[-1] == "-"):
        raise invalid_field(
            field,
            "DEVICE_ID_INVALID_LAST_CHARACTER",
            "the device id must end with a letter, a digit or '-'",
        )
    return device_id


def is_valid_device_id(raw: str) -> bool:
    try:
        normalise_device_id(raw)
    except InvalidArgument:
        return False
    return True
