"""The built-in endpoint's domain, for every hub of the emulator: entity and partition properties,
consumer groups, where a receiver starts and what it reads, and the wake-up of waiting receivers.

No AMQP here (``hub/amqp_endpoint.py`` is the protocol adapter).  Receivers read the hub's own SQLite
telemetry through :class:`EventHubStore`; the hub service tells this one when it has committed messages
(:meth:`EventHubService.stored`, a telemetry listener), which wakes the receivers of that partition at
once -- nobody polls.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from azure_iot_emulator.hub.eventhub.model import (
    DEFAULT_CONSUMER_GROUP,
    MAX_CONSUMER_GROUPS,
    Event,
    PartitionInfo,
    Position,
    entity_name,
    partition_of,
    valid_consumer_group,
)
from azure_iot_emulator.hub.eventhub.store import EventHubStore

Wake = Callable[[], None]
_PARTITION_ID = re.compile(r"0|[1-9][0-9]{0,2}")  # ASCII, no leading zero: at most 128 partitions


class EventHubError(Exception):
    """A request the endpoint refuses: ``status`` is the HTTP-style status (404 unknown, 400 invalid, 409
    conflict, 403 quota), ``condition`` the AMQP error condition for the same refusal."""

    def __init__(self, status: int, condition: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.condition = condition
        self.message = message


@dataclass(frozen=True)
class EntityInfo:
    name: str
    created: datetime
    partition_ids: tuple[str, ...]


class EventHubService:
    def __init__(
        self,
        store: EventHubStore,
        hub_hosts: Sequence[str],
        clock: Callable[[], datetime],
        retention: timedelta,
    ) -> None:
        self.store = store
        self._clock = clock
        self.retention = retention
        self._entities = {host: entity_name(host) for host in hub_hosts}
        self._waiting: dict[tuple[str, int], set[Wake]] = {}

    def _retained_since(self) -> datetime:
        return self._clock() - self.retention

    # ------------------------------------------------------------------------------------ properties
    def entity(self, hub: str) -> str:
        return self._entities[hub]

    def entity_info(self, hub: str) -> EntityInfo:
        count = self.store.partitions[hub]
        return EntityInfo(self._entities[hub], self.store.created[hub], tuple(str(i) for i in range(count)))

    def partition(self, hub: str, partition_id: str) -> int:
        """The partition named ``partition_id`` ("0".."n-1"); :class:`EventHubError` otherwise."""
        count = self.store.partitions[hub]
        if _PARTITION_ID.fullmatch(partition_id) is None or int(partition_id) >= count:
            raise EventHubError(
                404,
                "amqp:not-found",
                f"The partition '{partition_id[:50]}' does not exist (partitions are 0..{count - 1})",
            )
        return int(partition_id)

    def partition_info(self, hub: str, partition: int) -> PartitionInfo:
        return self.store.partition_info(hub, partition, self._retained_since())

    # ------------------------------------------------------------------------------- consumer groups
    def consumer_group(self, hub: str, name: str) -> tuple[str, datetime]:
        found = self.store.consumer_group(hub, name) if valid_consumer_group(name) else None
        if found is None:
            raise EventHubError(
                404,
                "amqp:not-found",
                f"The consumer group '{name[:60]}' does not exist on {self._entities[hub]}",
            )
        return found

    def consumer_groups(self, hub: str) -> list[tuple[str, datetime]]:
        return self.store.consumer_groups(hub)

    def create_consumer_group(self, hub: str, name: str) -> tuple[str, datetime]:
        if not valid_consumer_group(name):
            raise EventHubError(
                400,
                "amqp:invalid-field",
                "a consumer group name is 1-50 letters, digits, dots, underscores or hyphens",
            )
        created = self.store.add_consumer_group(hub, name, self._clock(), MAX_CONSUMER_GROUPS)
        if created is None:
            raise EventHubError(
                403,
                "amqp:resource-limit-exceeded",
                f"a hub has at most {MAX_CONSUMER_GROUPS} consumer groups",
            )
        return created

    def delete_consumer_group(self, hub: str, name: str) -> None:
        if name.lower() == DEFAULT_CONSUMER_GROUP.lower():
            raise EventHubError(400, "amqp:not-allowed", "the $Default consumer group cannot be deleted")
        if not valid_consumer_group(name) or not self.store.delete_consumer_group(hub, name):
            raise EventHubError(404, "amqp:not-found", f"The consumer group '{name[:60]}' does not exist")

    # --------------------------------------------------------------------------------------- reading
    def start_of(self, hub: str, partition: int, position: Position) -> int:
        return self.store.start_of(hub, partition, position, self._retained_since())

    def read(self, hub: str, partition: int, from_seq: int, limit: int) -> list[Event]:
        return self.store.read(hub, partition, from_seq, limit, self._retained_since())

    def watch(self, hub: str, partition: int, wake: Wake) -> Callable[[], None]:
        """Call ``wake`` (on the loop) whenever the partition gets events; returns the unsubscribe."""
        waiting = self._waiting.setdefault((hub, partition), set())
        waiting.add(wake)
        return functools.partial(waiting.discard, wake)

    def stored(self, hub: str, device_id: str) -> None:
        """The hub service's telemetry listener: an event of ``device_id`` on ``hub`` is committed."""
        count = self.store.partitions.get(hub)
        if count is None or not self._waiting:
            return
        for wake in list(self._waiting.get((hub, partition_of(device_id, count)), ())):
            wake()

    def prune(self) -> int:
        """Delete what is out of retention; returns how many messages."""
        return self.store.prune(self._retained_since())

