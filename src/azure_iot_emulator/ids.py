"""Azure's identifier rules (pure), applied on every REST and MQTT path before anything is looked up or
written.

- IoT Hub device id: 1-128 characters, case-sensitive, ASCII letters and digits and
  ``- : . + % _ # * ? ! ( ) , = @ ; $ '``.  ``.`` and ``..`` are refused as well: they are path segments
  every HTTP stack folds away, so such a device could never be addressed.
- DPS registration id (= enrollment id of an individual enrollment): 1-128 characters, case-insensitive,
  ASCII letters and digits and ``- . _ :``, ending in a letter, digit or ``-``.
- Message id (of a cloud-to-device message): the device id's characters, 1-128 of them.
"""

from __future__ import annotations

import re
from typing import TypeGuard

DEVICE_ID_MAX = 128
_DEVICE_ID = re.compile(r"[A-Za-z0-9\-:.+%_#*?!(),=@;$']{1,128}")
_REGISTRATION_ID = re.compile(r"[A-Za-z0-9._:-]{0,127}[A-Za-z0-9-]")

DEVICE_ID_RULE = (
    "a device id is 1-128 characters: ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ ' "
    "(not '.' or '..')"
)
MESSAGE_ID_RULE = (
    "a message id is 1-128 characters: ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '"
)
REGISTRATION_ID_RULE = (
    "a registration id is 1-128 characters: ASCII letters, digits and - . _ : , ending in a letter, "
    "digit or '-'"
)


def is_device_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _DEVICE_ID.fullmatch(value) is not None and value not in (".", "..")


def is_message_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _DEVICE_ID.fullmatch(value) is not None


def is_registration_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _REGISTRATION_ID.fullmatch(value) is not None
