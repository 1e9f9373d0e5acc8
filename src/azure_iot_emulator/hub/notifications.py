"""The hub's own notifications, as Azure emits them to routes: twin changes, identity lifecycle and
connection state (Microsoft's "IoT Hub non-telemetry event schemas").

Each is written, when a route of its hub takes it (``routing.py``), to the built-in endpoint inside the
transaction of the change it reports (a crash leaves both or neither), with

- system properties: ``content-type`` ``application/json``, ``content-encoding`` ``utf-8``, a unique
  ``correlation-id``, ``user-id`` the hub's name; annotations ``iothub-connection-device-id``,
  ``iothub-enqueuedtime`` and ``iothub-message-source`` (``twinChangeEvents``, ``deviceLifecycleEvents``,
  ``deviceConnectionStateEvents``);
- application properties: ``hubName``, ``deviceId``, ``opType``, ``operationTimestamp`` (ISO 8601) and
  ``iothub-message-schema`` (``twinChangeNotification``, ``deviceLifecycleNotification``,
  ``deviceConnectionStateNotification``);
- a JSON body: for ``updateTwin`` the twin's new ``version`` and what changed (``tags``, and under
  ``properties`` the ``desired`` or ``reported`` part with its ``$metadata`` and the section's
  ``$version``); for ``replaceTwin`` and the lifecycle events the whole twin (``deviceId``, ``etag``,
  ``version``, ``tags``, ``properties``), for a deletion as it was; for connection state a
  ``sequenceNumber``, 64 hexadecimal digits that grow with every event.

Which changes raise them: the service's twin PATCH (``updateTwin``, tags included) and PUT
(``replaceTwin``); a device's reported patch (``updateTwin``); a device created or deleted through the
registry API, created by a DPS registration (its twin as the registration left it, initial twin included),
or moved by DPS to another hub (deleted there); an initial twin DPS applies to an existing device
(``replaceTwin``); an MQTT connection that opens or closes.
"""

from __future__ import annotations

import copy
import itertools
import json
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from azure_iot_emulator.hub import twin as twinmodel
from azure_iot_emulator.hub.eventhub.model import entity_name
from azure_iot_emulator.hub.registry import (
    CREATE_IDENTITY,
    DELETE_IDENTITY,
    REPLACE_TWIN,
    HubRegistry,
    twin_etag,
)
from azure_iot_emulator.hub.routing import (
    DEVICE_CONNECTION_STATE_EVENTS,
    DEVICE_LIFECYCLE_EVENTS,
    TWIN_CHANGE_EVENTS,
    HubRoutes,
    notification_row,
)
from azure_iot_emulator.hub.telemetry import TelemetryStore
from azure_iot_emulator.hub.timefmt import azure_time

UPDATE_TWIN = "updateTwin"
DEVICE_CONNECTED = "deviceConnected"
DEVICE_DISCONNECTED = "deviceDisconnected"

# route source -> (iothub-message-source, iothub-message-schema)
_KINDS = {
    TWIN_CHANGE_EVENTS: ("twinChangeEvents", "twinChangeNotification"),
    DEVICE_LIFECYCLE_EVENTS: ("deviceLifecycleEvents", "deviceLifecycleNotification"),
    DEVICE_CONNECTION_STATE_EVENTS: ("deviceConnectionStateEvents", "deviceConnectionStateNotification"),
}
_TICKS_EPOCH = datetime(1601, 1, 1, tzinfo=UTC)  # connection sequence numbers start with FILETIME ticks

# Told (hub, device id) of each event committed to a hub's built-in store, in order: the built-in
# endpoint wakes the receivers of that device's partition.
EventListener = Callable[[str, str], None]


def twin_document(device_id: str, twin: twinmodel.Twin) -> dict[str, Any]:
    """The whole twin as replace and lifecycle notifications carry it."""
    document: dict[str, Any] = {
        "deviceId": device_id,
        "etag": twin_etag(twin.version),
        "version": twin.version,
    }
    if twin.tags:
        document["tags"] = copy.deepcopy(twin.tags)
    document["properties"] = {"desired": twin.desired.document(), "reported": twin.reported.document()}
    return document


def section_change(patch: Mapping[str, Any], section: twinmodel.Section) -> dict[str, Any]:
    """What changed in a property section: the patch, the metadata of its keys and the section's."""
    change = copy.deepcopy(dict(patch))
    metadata = {key: copy.deepcopy(section.metadata[key]) for key in patch if key in section.metadata}
    metadata.update({k: v for k, v in section.metadata.items() if k.startswith("$")})
    change["$metadata"] = metadata
    change["$version"] = section.version
    return change


def update_document(
    twin: twinmodel.Twin,
    *,
    tags: Mapping[str, Any] | None = None,
    desired: Mapping[str, Any] | None = None,
    reported: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An ``updateTwin`` body: the twin's new version and the changed parts."""
    document: dict[str, Any] = {"version": twin.version}
    if tags is not None:
        document["tags"] = copy.deepcopy(dict(tags))
    properties: dict[str, Any] = {}
    if desired is not None:
        properties["desired"] = section_change(desired, twin.desired)
    if reported is not None:
        properties["reported"] = section_change(reported, twin.reported)
    if properties:
        document["properties"] = properties
    return document


class Notifier:
    """Writes the notifications the hubs' routes take to the built-in endpoint (``routing`` by hub host),
    and tells ``listeners`` (the built-in endpoint's receivers) of each."""

    def __init__(
        self,
        routing: Mapping[str, HubRoutes],
        registry: HubRegistry,
        telemetry: TelemetryStore,
        clock: Callable[[], datetime],
        listeners: list[EventListener],
    ) -> None:
        self._routing = routing
        self._registry = registry
        self._telemetry = telemetry
        self._clock = clock
        self._listeners = listeners
        self._counter = itertools.count()
        registry.identity_listeners.append(self._identity)

    def takes(self, hub: str, source: str) -> bool:
        routes = self._routing.get(hub)
        return routes is not None and routes.takes(source)

    # --------------------------------------------------------------------------------------- events
    def twin_updated(self, hub: str, device_id: str, body: Callable[[], dict[str, Any]]) -> None:
        """A twin patched (service or device); ``body`` builds the ``updateTwin`` body when a route wants it.
        Call inside the transaction that saves the twin."""
        if self.takes(hub, TWIN_CHANGE_EVENTS):
            self._emit(hub, device_id, TWIN_CHANGE_EVENTS, UPDATE_TWIN, body())

    def twin_replaced(self, hub: str, device_id: str) -> None:
        if self.takes(hub, TWIN_CHANGE_EVENTS):
            self._emit(hub, device_id, TWIN_CHANGE_EVENTS, REPLACE_TWIN, self._whole_twin(hub, device_id))

    def connection(self, hub: str, device_id: str, connected: bool) -> None:
        if not self.takes(hub, DEVICE_CONNECTION_STATE_EVENTS):
            return
        now = self._clock()
        ticks = (now - _TICKS_EPOCH) // timedelta(microseconds=1) * 10  # 100 ns since 1601, as FILETIME
        body = {"sequenceNumber": f"{0:016X}{ticks:016X}{next(self._counter):032X}"}
        op_type = DEVICE_CONNECTED if connected else DEVICE_DISCONNECTED
        self._emit(hub, device_id, DEVICE_CONNECTION_STATE_EVENTS, op_type, body, now)

    def _identity(self, hub: str, device_id: str, op_type: str) -> None:
        if op_type == REPLACE_TWIN:
            self.twin_replaced(hub, device_id)
        elif op_type in (CREATE_IDENTITY, DELETE_IDENTITY) and self.takes(hub, DEVICE_LIFECYCLE_EVENTS):
            self._emit(hub, device_id, DEVICE_LIFECYCLE_EVENTS, op_type, self._whole_twin(hub, device_id))

    def _whole_twin(self, hub: str, device_id: str) -> dict[str, Any]:
        twin = self._registry.get_twin(hub, device_id)
        assert twin is not None, "told of a device without its twin"
        return twin_document(device_id, twin)

    def _emit(
        self,
        hub: str,
        device_id: str,
        source: str,
        op_type: str,
        body: dict[str, Any],
        when: datetime | None = None,
    ) -> None:
        message_source, schema = _KINDS[source]
        name = entity_name(hub)
        system = {
            "contentType": "application/json",
            "contentEncoding": "utf-8",
            "correlationId": uuid.uuid4().hex,
            "userId": name,
        }
        application = {
            "hubName": name,
            "deviceId": device_id,
            "operationTimestamp": azure_time(when or self._clock()),
            "iothub-message-schema": schema,
            "opType": op_type,
        }
        row = notification_row(system, application, device_id, body)
        if not self._routing[hub].notification(source, row):
            return
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        stored = self._telemetry.insert_event(hub, device_id, message_source, system, application, data)
        for listener in self._listeners:
            listener(stored.hub, stored.device_id)

