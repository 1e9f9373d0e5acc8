"""The built-in endpoint's vocabulary, pure: entity names, partition assignment, consumer group names,
event positions (Event Hubs' selector filters) and the events themselves.

- Entity: the Event Hub-compatible name is the hub's name -- the first label of its host name
  (``myhub`` for ``myhub.azure-devices.net``), or the whole address when the hub is served on an IP
  literal (``127.0.0.2``).
- Partitions: ``"0"`` .. ``str(count - 1)``; a device's messages all go to one partition,
  ``sha256(device id)`` modulo the count (stable across restarts, as Azure's assignment by device id is).
- Sequence numbers count from 0 in each partition, without gaps; the offset of an event is the hub store's
  number of the message (increasing within a partition, opaque to clients, as Event Hubs' byte offsets
  are); the enqueued time is the hub's.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime

DEFAULT_PARTITIONS = 4  # Azure's default partition count for a hub's built-in endpoint (2..128)
MIN_PARTITIONS = 2
MAX_PARTITIONS = 128
DEFAULT_RETENTION_DAYS = 1.0  # Azure's default; 1..7 days on Azure
DEFAULT_CONSUMER_GROUP = "$Default"
MAX_CONSUMER_GROUPS = 20  # per hub, Azure's limit for the standard tiers ($Default counts)
_CONSUMER_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,49}")


class PositionError(ValueError):
    """A selector filter this endpoint cannot serve (``amqp:invalid-field`` / argument error)."""


def entity_name(host: str) -> str:
    """The Event Hub-compatible name of the hub served on ``host``."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.split(".", 1)[0].lower()


@functools.lru_cache(maxsize=65536)  # every stored message and every wake-up asks; a device's never changes
def partition_of(device_id: str, count: int) -> int:
    digest = hashlib.sha256(device_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def valid_consumer_group(name: str) -> bool:
    """Azure's rule for consumer group names: 1-50 letters, digits, ``.``, ``_``, ``-``, starting with a
    letter or digit (``$Default`` is the built-in one)."""
    return name == DEFAULT_CONSUMER_GROUP or _CONSUMER_GROUP.fullmatch(name) is not None


@dataclass(frozen=True)
class Position:
    """Where a receiver starts: events with ``field`` above (or at, ``inclusive``) ``value``.

    ``field`` is ``offset``, ``sequence`` or ``enqueued`` (milliseconds since the epoch); the offsets
    ``-1`` (the start) and ``@latest`` (after the last event) are Event Hubs' special values."""

    field: str
    value: int
    inclusive: bool = False
    latest: bool = False

    @classmethod
    def start(cls) -> Position:
        return cls("offset", -1)


_SELECTOR = re.compile(
    r"\s*amqp\.annotation\.(x-opt-offset|x-opt-sequence-number|x-opt-enqueued-time)\s*(>=|>|=)\s*"
    r"(?:'([^']*)'|(-?\d+))\s*",
    re.IGNORECASE,
)
_FIELDS = {"x-opt-offset": "offset", "x-opt-sequence-number": "sequence", "x-opt-enqueued-time": "enqueued"}
# What a position may hold: a SQLite integer (one more is added for ">"), or milliseconds from the epoch to
# the end of year 9999 (a datetime's range).
_RANGES = {
    "offset": (-1, 2**62),
    "sequence": (-1, 2**62),
    "enqueued": (0, 253402300799998),
}


def parse_selector(text: str | None) -> Position:
    """An ``apache.org:selector-filter:string`` as Event Hubs' clients send it
    (``amqp.annotation.x-opt-offset > '123'``, ``... x-opt-sequence-number >= '5'``,
    ``... x-opt-enqueued-time > '1700000000000'``); none at all is the start of the partition."""
    if text is None:
        return Position.start()
    match = _SELECTOR.fullmatch(text)
    if match is None:
        raise PositionError(f"unsupported selector filter: {text[:200]!r}")
    name, operator, quoted, bare = match.groups()
    field = _FIELDS[name.lower()]
    raw = quoted if quoted is not None else bare
    inclusive = operator in (">=", "=")
    if field == "offset" and raw == "@latest":
        return Position("offset", 0, latest=True)
    try:
        value = int(raw)
    except ValueError:
        raise PositionError(f"{name} must be an integer, not {raw[:50]!r}") from None
    low, high = _RANGES[field]
    if not low <= value <= high:
        raise PositionError(f"{name} must be {low} to {high}, not {raw[:50]!r}")
    return Position(field, value, inclusive)


def millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def parse_enqueued(text: str) -> datetime:
    """The hub store's enqueue time (``2024-05-01T10:11:12.1234560Z``) as an aware datetime."""
    return datetime.strptime(text[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)


@dataclass(frozen=True)
class Event:
    """One event as the built-in endpoint serves it: a device-to-cloud message (``source`` ``Telemetry``)
    or one of the hub's notifications that a route sent there (``twinChangeEvents``...)."""

    partition: int
    sequence_number: int
    offset: int
    enqueued_time: datetime
    device_id: str
    system_properties: dict[str, str]
    application_properties: dict[str, str]
    body: bytes
    source: str = "Telemetry"


@dataclass(frozen=True)
class PartitionInfo:
    partition: int
    begin_sequence_number: int
    last_sequence_number: int
    last_offset: int
    last_enqueued_time: datetime | None
    empty: bool
