"""Reading hubs' telemetry the way any back end reads it: from each hub's built-in Event Hub-compatible
endpoint, with azure-eventhub's aio consumer and the connection strings and CA of ``connection.json``.
``iot-emulator monitor`` and the demo's live view use it; nothing here touches the emulator's files.

    tail = TelemetryTail(info["hubs"], info["ca_pem_path"])
    ends = await tail.ends()                          # {(hub, partition id): last sequence number}
    await tail.start(on_message, after=ends)          # every partition after those points (else all)
    ...
    await tail.close()

Each event arrives as a :class:`StoredMessage` numbered as the hub's store numbers it (the event's offset), so
what is printed matches ``iot-emulator messages`` and the hub REST API.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from azure.eventhub import EventData
from azure.eventhub.aio import EventHubConsumerClient, PartitionContext

from azure_iot_emulator.connection_info import HubConnection
from azure_iot_emulator.hub.telemetry import StoredMessage
from azure_iot_emulator.hub.timefmt import azure_time

# The event's AMQP properties -> the hub's system property names (as the store and the REST API name them).
_SYSTEM = {
    b"message-id": "messageId",
    b"correlation-id": "correlationId",
    b"user-id": "userId",
    b"content-type": "contentType",
    b"content-encoding": "contentEncoding",
}
DEVICE_ID = b"iothub-connection-device-id"

# (the message, its partition id, its sequence number in that partition)
OnMessage = Callable[[StoredMessage, str, int], None]
OnError = Callable[[str, Exception], None]


class EndpointMissing(ValueError):
    """``connection.json`` names no built-in endpoint for a hub (an emulator from before it had one)."""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _body(event: EventData) -> bytes:
    """The event's data sections, joined (IoT Hub sends one)."""
    body = event.body
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return b"".join(part for part in (body or ()) if isinstance(part, bytes))  # type: ignore[union-attr]


def stored_message(hub: str, event: EventData) -> StoredMessage:
    """An event of ``hub``'s built-in endpoint as the hub's store describes the message."""
    system = event.system_properties
    properties = {_text(k): _text(v) for k, v in (event.properties or {}).items()}
    enqueued = event.enqueued_time
    return StoredMessage(
        seq=int(event.offset or 0),
        hub=hub,
        device_id=_text(system.get(DEVICE_ID, b"")),
        enqueued_time=azure_time(enqueued) if enqueued is not None else "",
        system_properties={name: _text(system[key]) for key, name in _SYSTEM.items() if key in system},
        application_properties=properties,
        body=_body(event),
    )


def consumer(hub: HubConnection, ca_path: str, group: str = "$Default") -> EventHubConsumerClient:
    connection_string = hub.get("eventhub_connection_string")
    if not connection_string:
        raise EndpointMissing(f"connection.json names no built-in endpoint for hub {hub['host_name']}")
    return EventHubConsumerClient.from_connection_string(
        connection_string, consumer_group=group, connection_verify=ca_path
    )


class TelemetryTail:
    """Every partition of the given hubs' built-in endpoints, into one callback."""

    def __init__(self, hubs: Sequence[HubConnection], ca_path: str, *, group: str = "$Default") -> None:
        self._clients = {hub["host_name"]: consumer(hub, ca_path, group) for hub in hubs}
        self._tasks: list[asyncio.Task[None]] = []

    async def ends(self) -> dict[tuple[str, str], int]:
        """The last sequence number of every partition now (-1 when empty): a starting point after which
        everything is new."""
        ends: dict[tuple[str, str], int] = {}
        for hub, client in self._clients.items():
            for partition in await client.get_partition_ids():
                info = await client.get_partition_properties(partition)
                ends[(hub, partition)] = int(info["last_enqueued_sequence_number"])
        return ends

    async def start(
        self,
        on_message: OnMessage,
        *,
        after: Mapping[tuple[str, str], int] | None = None,
        on_error: OnError | None = None,
    ) -> None:
        """Receive from every partition: after the sequence numbers in ``after`` (a partition it does not
        name: from its end), else from the start."""
        for hub, client in self._clients.items():
            starting: dict[str, Any] | str = "-1"
            if after is not None:
                starting = {partition: seq for (name, partition), seq in after.items() if name == hub}

            async def on_event(context: PartitionContext, event: EventData | None, hub: str = hub) -> None:
                if event is not None:
                    seq = event.sequence_number if event.sequence_number is not None else -1
                    on_message(stored_message(hub, event), context.partition_id, seq)

            async def on_failure(context: PartitionContext | None, error: Exception, hub: str = hub) -> None:
                if on_error is not None:
                    on_error(hub, error)

            self._tasks.append(
                asyncio.create_task(
                    client.receive(on_event=on_event, on_error=on_failure, starting_position=starting)
                )
            )

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        for task in self._tasks:  # receive() may sleep out a load-balancing interval after close()
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
