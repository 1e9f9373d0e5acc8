"""Protobuf values both ways: enum names as people read them (without their prefix), and times.

``timestamp(moment)`` / ``set_time(field, moment)``   an aware datetime as a ``google.protobuf.Timestamp``
(the value ``Timestamp.FromDatetime`` gives, without its Python-level work: on the minting hot path).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from google.protobuf import timestamp_pb2


class EnumType(Protocol):
    """A generated protobuf enum (its class, whose metaclass names the numbers)."""

    def Name(self, number: int, /) -> str: ...


def enum_label(enum_type: EnumType, value: int, prefix: str) -> str:
    """``enum_label(pb.Lifecycle, 2, "LIFECYCLE_")`` -> ``"ACTIVE"``."""
    return enum_type.Name(value).removeprefix(prefix)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    set_time(message, moment)
    return message


def set_time(field: timestamp_pb2.Timestamp, moment: datetime) -> None:
    delta = moment - _EPOCH  # days may be negative; seconds and microseconds never are
    field.seconds = delta.days * 86_400 + delta.seconds
    field.nanos = delta.microseconds * 1_000
