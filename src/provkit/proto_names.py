"""Protobuf values as people read them: enum names without their prefix."""

from __future__ import annotations

from typing import Protocol


class EnumType(Protocol):
    """A generated protobuf enum (its class, whose metaclass names the numbers)."""

    def Name(self, number: int, /) -> str: ...


def enum_label(enum_type: EnumType, value: int, prefix: str) -> str:
    """``enum_label(pb.Lifecycle, 2, "LIFECYCLE_")`` -> ``"ACTIVE"``."""
    return enum_type.Name(value).removeprefix(prefix)
