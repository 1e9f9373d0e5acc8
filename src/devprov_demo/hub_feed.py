"""The telemetry the emulator's hubs received, read as any back end reads Azure's: from each hub's built-in
Event Hub-compatible endpoint (AMQP 5671, azure-eventhub), with the connection strings and CA of the
emulator's ``connection.json`` - never its database (``azure_iot_emulator.hub.eventhub.reader``).

    feed = HubFeed(emulator.connection)
    new = await feed.read_new()      # every hub's messages since the last call (the first: all retained)
    await feed.close()

The consumer reconnects by itself after the emulator restarted; ``unreachable`` names the hubs whose reading
failed since the last call, and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from azure_iot_emulator.connection_info import ConnectionInfo
from azure_iot_emulator.hub.eventhub.reader import EndpointMissing, TelemetryTail
from azure_iot_emulator.hub.telemetry import StoredMessage


@dataclass(frozen=True)
class ReceivedMessage:
    seq: int  # the hub's number of the message (its offset on the built-in endpoint; increasing)
    hub: str
    device_id: str
    enqueued_time: str  # ISO 8601, UTC
    body: bytes

    def body_text(self) -> str | None:
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            return None


class HubFeed:
    def __init__(self, connection: ConnectionInfo) -> None:
        self._connection = connection
        self._tail: TelemetryTail | None = None
        self._new: list[ReceivedMessage] = []
        self._failures: dict[str, str] = {}
        self.unreachable: dict[str, str] = {}

    def _take(self, message: StoredMessage, partition: str, seq: int) -> None:
        self._new.append(
            ReceivedMessage(message.seq, message.hub, message.device_id, message.enqueued_time, message.body)
        )

    def _failed(self, hub: str, error: Exception) -> None:
        self._failures[hub] = f"{type(error).__name__}: {error}"

    async def read_new(self) -> list[ReceivedMessage]:
        """What arrived since the last call, oldest first per hub."""
        if self._tail is None:
            try:
                tail = TelemetryTail(self._connection["hubs"], self._connection["ca_pem_path"])
            except EndpointMissing as exc:
                self.unreachable = {hub["host_name"]: str(exc) for hub in self._connection["hubs"]}
                return []
            await tail.start(self._take, on_error=self._failed)
            self._tail = tail
        found, self._new = self._new, []
        self.unreachable, self._failures = self._failures, {}
        return sorted(found, key=lambda m: (m.hub, m.seq))

    async def close(self) -> None:
        if self._tail is not None:
            await self._tail.close()
            self._tail = None
