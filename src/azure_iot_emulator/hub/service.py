"""The IoT Hub domain: what the service REST API and the device MQTT endpoint both act on.

Plain asyncio, no HTTP and no MQTT here: identity CRUD with etags, twins (service and device views),
desired-property pushes to connected devices, direct-method correlation, telemetry ingest, cloud-to-device
messages (queued per device, delivered to connected devices: ``c2d_queue.py``), and the notifications the
hubs' routes take (twin changes, identity lifecycle, connection state: ``notifications.py``), each written
in the transaction of the change it reports.  Errors are
:class:`HubError` carrying Azure's HTTP status and error-code name/number, which the REST layer turns
into Azure's envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import jsonsafe
from azure_iot_emulator.hub import topics
from azure_iot_emulator.hub import twin as twinmodel
from azure_iot_emulator.hub.c2d import C2dLimits, C2dMessage
from azure_iot_emulator.hub.c2d_queue import C2dQueue, C2dStore
from azure_iot_emulator.hub.notifications import EventListener, Notifier, update_document
from azure_iot_emulator.hub.query import QueryError, parse_query
from azure_iot_emulator.hub.registry import (
    Device,
    HubRegistry,
    RegistryError,
    device_spec_from_json,
    twin_etag,
)
from azure_iot_emulator.hub.routing import HubRoutes
from azure_iot_emulator.hub.telemetry import MAX_MESSAGE_BYTES, StoredMessage, TelemetryStore
from azure_iot_emulator.quotas import TokenBuckets

log = logging.getLogger(__name__)

METHOD_TIMEOUT_DEFAULT = 30
METHOD_TIMEOUT_MIN = 5
METHOD_TIMEOUT_MAX = 300
METHOD_PAYLOAD_MAX_BYTES = 128 * 1024
PUSH_TIMEOUT_SECONDS = 10.0
COMMIT_INTERVAL = 0.004  # telemetry group commit: at most one transaction per this many seconds


class HubError(Exception):
    """An IoT Hub error as Azure reports it."""

    def __init__(self, status: int, code: str, number: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.number = number
        self.message = message


def _not_found(device_id: str) -> HubError:
    return HubError(404, "DeviceNotFound", 404001, f"Device {device_id} not registered")


def _invalid(message: str) -> HubError:
    return HubError(400, "ArgumentInvalid", 400004, message)


def _precondition(message: str = "Precondition failed: etag mismatch") -> HubError:
    return HubError(412, "PreconditionFailed", 412002, message)


class DeviceChannel(Protocol):
    """The live MQTT connection of a device, as the domain needs it (the core's ``Link``)."""

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None: ...

    def publish_acked(self, topic: str, payload: bytes, on_ack: Callable[[], None]) -> None: ...

    def is_subscribed(self, topic: str) -> bool: ...


def _etag_matches(if_match: str | None, current: str) -> bool:
    if if_match is None:
        return True
    value = if_match.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"')
    return value == "*" or value == current.strip('"')


@dataclass
class _PendingMethod:
    hub: str
    device_id: str
    future: asyncio.Future[tuple[int, Any]]


@dataclass
class _IngestWaiter:
    """One caller waiting for ``count`` queued messages from index ``start`` of the pending batch."""

    future: asyncio.Future[list[StoredMessage] | None]
    start: int
    count: int
    wants_messages: bool
    release_at: float = 0.0  # loop time before which the caller is not told (D2C traffic shaping)


def _too_large(size: int) -> HubError:
    return HubError(413, "MessageTooLarge", 413001, f"message of {size} bytes exceeds 256 KB")


def _stored(seq: int, enqueued: str, item: tuple[str, str, topics.PropertyBag, bytes]) -> StoredMessage:
    hub, device_id, properties, body = item
    return StoredMessage(
        seq, hub, device_id, enqueued, dict(properties.system), dict(properties.application), body
    )


def _resolve(future: asyncio.Future[list[StoredMessage] | None], value: list[StoredMessage] | None) -> None:
    if not future.done():
        future.set_result(value)


def _settle(waiter: _IngestWaiter, value: list[StoredMessage] | None) -> None:
    """Tell the caller its messages are stored, at once or (traffic shaping) at ``release_at``."""
    future = waiter.future
    if not waiter.release_at:  # not shaped
        future.set_result(value)
        return
    loop = future.get_loop()
    wait = waiter.release_at - loop.time()
    if wait <= 0:
        future.set_result(value)
    else:
        loop.call_later(wait, _resolve, future, value)


class HubService:
    def __init__(
        self,
        registry: HubRegistry,
        telemetry: TelemetryStore,
        clock: Callable[[], datetime],
        d2c_quota: TokenBuckets | None = None,
        *,
        c2d_limits: C2dLimits | None = None,
        routing: Mapping[str, HubRoutes] | None = None,
    ) -> None:
        """``d2c_quota``: the device-to-cloud rate per hub (``--azure-quotas``): messages over it are
        stored at once but acknowledged late, as Azure shapes the traffic of a throttled hub.
        ``c2d_limits``: the hub's cloud-to-device settings (default TTL, max delivery count).
        ``routing``: each hub's routes (none: Azure's default, device messages only)."""
        self._d2c = d2c_quota
        self.registry = registry
        self.telemetry = telemetry
        self.c2d = C2dQueue(C2dStore(registry.database), clock, c2d_limits or C2dLimits())
        self._clock = clock
        self._channels: dict[tuple[str, str], DeviceChannel] = {}
        self._device_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._pending_methods: dict[str, _PendingMethod] = {}
        self._telemetry_listeners: list[EventListener] = []
        registry.credential_listeners.append(self._drop_connection)
        self.notifier = Notifier(routing or {}, registry, telemetry, clock, self._telemetry_listeners)
        self._ingest_items: list[tuple[str, str, topics.PropertyBag, bytes]] = []
        self._ingest_waiters: list[_IngestWaiter] = []
        self._last_commit = float("-inf")

    @property
    def hub_hosts(self) -> tuple[str, ...]:
        return self.registry.hub_hosts

    def _lock(self, hub: str, device_id: str) -> asyncio.Lock:
        return self._device_locks.setdefault((hub, device_id), asyncio.Lock())

    # ----------------------------------------------------------------------------------- connections
    def _connection_state(self, hub: str, device_id: str, connected: bool) -> None:
        with self.registry.database.transaction():
            self.registry.set_connection_state(hub, device_id, connected)
            self.notifier.connection(hub, device_id, connected)

    def attach(self, hub: str, device_id: str, channel: DeviceChannel) -> None:
        self._channels[(hub, device_id)] = channel
        self._connection_state(hub, device_id, True)
        self.c2d.deliver(hub, device_id, channel)  # the backlog, if its session kept the subscription

    def detach(self, hub: str, device_id: str, channel: DeviceChannel) -> None:
        if self._channels.get((hub, device_id)) is not channel:
            return  # a newer connection already replaced this one
        del self._channels[(hub, device_id)]
        self._connection_state(hub, device_id, False)
        self.c2d.forget(hub, device_id, channel)
        for rid, pending in list(self._pending_methods.items()):
            if (pending.hub, pending.device_id) == (hub, device_id) and not pending.future.done():
                pending.future.set_exception(
                    HubError(404, "DeviceConnectionClosedRemotely", 404104, "device disconnected")
                )
                del self._pending_methods[rid]

    def channel(self, hub: str, device_id: str) -> DeviceChannel | None:
        return self._channels.get((hub, device_id))

    def is_connected(self, hub: str, device_id: str) -> bool:
        return (hub, device_id) in self._channels

    # --------------------------------------------------------------------------------------- devices
    def get_device(self, hub: str, device_id: str) -> dict[str, Any]:
        device = self.registry.get_device(hub, device_id)
        if device is None:
            raise _not_found(device_id)
        return self._counted(hub, [device.to_json()])[0]

    def list_devices(self, hub: str, top: int | None = None) -> list[dict[str, Any]]:
        return self._counted(hub, [device.to_json() for device in self.registry.list_devices(hub, top)])

    def _counted(self, hub: str, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Device or twin documents with Azure's ``cloudToDeviceMessageCount``: the device's queue depth."""
        depths = self.c2d.depths(hub)
        for document in documents:
            document["cloudToDeviceMessageCount"] = depths.get(document["deviceId"], 0)
        return documents

    def put_device(self, hub: str, device_id: str, body: Any, if_match: str | None) -> dict[str, Any]:
        try:
            spec = device_spec_from_json(device_id, body)
        except RegistryError as exc:
            raise _invalid(str(exc)) from exc
        current = self.registry.get_device(hub, device_id)
        if current is None:
            if if_match is not None and if_match.strip().strip('"') != "*":
                raise _not_found(device_id)
            return self.registry.create_device(hub, spec).to_json()
        if if_match is None:
            raise HubError(
                409, "DeviceAlreadyExists", 409001, f"A device with ID '{device_id}' is already registered."
            )
        if not _etag_matches(if_match, current.etag):
            raise _precondition()
        updated = self.registry.update_device(hub, spec)
        if (
            updated.status == "disabled"
            or updated.auth_type != current.auth_type
            or (updated.primary_thumbprint, updated.secondary_thumbprint)
            != (current.primary_thumbprint, current.secondary_thumbprint)
        ):
            self._drop_connection(hub, device_id)
        return self._counted(hub, [updated.to_json()])[0]

    def delete_device(self, hub: str, device_id: str, if_match: str | None) -> None:
        current = self.registry.get_device(hub, device_id)
        if current is None:
            raise _not_found(device_id)
        if not _etag_matches(if_match, current.etag):
            raise _precondition()
        self.registry.delete_device(hub, device_id)
        self._drop_connection(hub, device_id)

    def _drop_connection(self, hub: str, device_id: str) -> None:
        channel = self._channels.get((hub, device_id))
        close = getattr(channel, "close", None)
        if callable(close):
            close()

    def query_devices(self, hub: str, query: str) -> list[dict[str, Any]]:
        """The twin query language subset of ``hub/query.py`` over this hub's twins; anything it does not
        implement is a 400 naming the problem, never a guessed answer."""
        try:
            parsed = parse_query(query)
        except QueryError as exc:
            raise _invalid(f"unsupported or malformed query: {exc}") from exc
        twins = []
        for device in self.registry.list_devices(hub):
            twin = self.registry.get_twin(hub, device.device_id)
            assert twin is not None
            twins.append(self.registry.twin_json(device, twin))
        return parsed.run(self._counted(hub, twins))

    # ----------------------------------------------------------------------------------------- twins
    def get_twin(self, hub: str, device_id: str) -> dict[str, Any]:
        device, twin = self._device_and_twin(hub, device_id)
        return self._counted(hub, [self.registry.twin_json(device, twin)])[0]

    def _device_and_twin(self, hub: str, device_id: str) -> tuple[Device, twinmodel.Twin]:
        device = self.registry.get_device(hub, device_id)
        twin = self.registry.get_twin(hub, device_id) if device else None
        if device is None or twin is None:
            raise _not_found(device_id)
        return device, twin

    async def update_twin(
        self, hub: str, device_id: str, body: Any, if_match: str | None, *, replace_all: bool
    ) -> dict[str, Any]:
        """Service PATCH (merge) or PUT (replace) of tags and desired properties."""
        if not isinstance(body, Mapping):
            raise _invalid("twin body must be a JSON object")
        tags = body.get("tags")
        properties = body.get("properties")
        if properties is not None and not isinstance(properties, Mapping):
            raise _invalid("properties must be a JSON object")
        try:
            written_reported = (
                twinmodel.strip_service_readonly(properties.get("reported")) if properties else {}
            )
        except twinmodel.TwinError as exc:
            raise _invalid(str(exc)) from exc
        if written_reported:
            raise _invalid("reported properties can only be written by the device")
        async with self._lock(hub, device_id):
            device, twin = self._device_and_twin(hub, device_id)
            if not _etag_matches(if_match, twin_etag(twin.version)):
                raise _precondition()
            try:
                desired = twinmodel.strip_service_readonly(properties.get("desired")) if properties else None
                if properties is not None and "desired" not in properties:
                    desired = None
                clean_tags = twinmodel.strip_service_readonly(tags) if tags is not None else None
                if replace_all:
                    clean_tags = clean_tags or {}
                    desired = desired or {}
                updated, delta = twinmodel.apply_service_update(
                    twin,
                    tags=clean_tags,
                    desired=desired,
                    timestamp=self.registry.now(),
                    replace_all=replace_all,
                )
            except twinmodel.TwinError as exc:
                raise _invalid(str(exc)) from exc
            if updated is not twin:
                with self.registry.database.transaction():
                    self.registry.save_twin(hub, device_id, updated)
                    if replace_all:
                        self.notifier.twin_replaced(hub, device_id)
                    else:
                        changed_tags = clean_tags if updated.tags != twin.tags else None
                        self.notifier.twin_updated(
                            hub,
                            device_id,
                            lambda: update_document(updated, tags=changed_tags, desired=delta),
                        )
            if delta is not None:
                await self._push_desired(hub, device_id, delta, updated.desired.version)
            return self._counted(hub, [self.registry.twin_json(device, updated)])[0]

    async def _push_desired(self, hub: str, device_id: str, delta: dict[str, Any], version: int) -> None:
        channel = self._channels.get((hub, device_id))
        if channel is None:
            return
        topic = topics.desired_patch_topic(version)
        if not channel.is_subscribed(topic):
            return
        payload = json.dumps({**delta, "$version": version}).encode("utf-8")
        try:
            await asyncio.wait_for(channel.publish(topic, payload, 1), PUSH_TIMEOUT_SECONDS)
        except (TimeoutError, ConnectionError, OSError) as exc:
            # The device reconciles on reconnect (twin GET + version compare), as Azure's SDK does.
            log.info("desired patch to %s/%s not delivered: %s", hub, device_id, exc)

    def device_twin_document(self, hub: str, device_id: str) -> dict[str, Any]:
        """What a device gets on ``$iothub/twin/GET``: desired and reported with ``$version``."""
        _, twin = self._device_and_twin(hub, device_id)
        desired = {**twin.desired.props, "$version": twin.desired.version}
        reported = {**twin.reported.props, "$version": twin.reported.version}
        return {"desired": desired, "reported": reported}

    async def patch_reported(self, hub: str, device_id: str, payload: bytes) -> int:
        """A device's reported patch; returns the new reported ``$version``.  HubError(400) on bad input."""
        try:
            patch = jsonsafe.loads(payload)
        except jsonsafe.JsonRefused as exc:
            raise _invalid(f"reported patch refused ({exc.reason}): {exc}") from exc
        async with self._lock(hub, device_id):
            _, twin = self._device_and_twin(hub, device_id)
            try:
                updated = twinmodel.apply_reported_patch(twin, patch, timestamp=self.registry.now())
            except twinmodel.TwinError as exc:
                raise _invalid(str(exc)) from exc
            with self.registry.database.transaction():
                self.registry.save_twin(hub, device_id, updated)
                self.notifier.twin_updated(hub, device_id, lambda: update_document(updated, reported=patch))
            return updated.reported.version

    # ------------------------------------------------------------------------------------- telemetry
    def add_telemetry_listener(self, listener: EventListener) -> None:
        """``listener(hub, device_id)`` after each committed event of the hub's built-in store (device
        messages and the hub's own notifications), in order."""
        self._telemetry_listeners.append(listener)

    async def ingest(
        self, hub: str, device_id: str, properties: topics.PropertyBag, body: bytes
    ) -> StoredMessage:
        """Store one device-to-cloud message durably; returns once it is committed.  Messages arriving
        in the same event-loop turn (from many devices) share one commit (group commit)."""
        if len(body) > MAX_MESSAGE_BYTES:
            raise _too_large(len(body))
        waiter = _IngestWaiter(asyncio.get_running_loop().create_future(), len(self._ingest_items), 1, True)
        self._queue_ingest([(hub, device_id, properties, body)], waiter)
        messages = await waiter.future
        assert messages is not None
        return messages[0]

    async def ingest_many(
        self, hub: str, device_id: str, messages: Sequence[tuple[topics.PropertyBag, bytes]]
    ) -> None:
        """Store several messages of one device durably, in order; returns once they are committed
        (they join the same group commit as everything else arriving in this event-loop turn)."""
        await self.submit_many(hub, device_id, messages)

    def submit_many(
        self, hub: str, device_id: str, messages: Sequence[tuple[topics.PropertyBag, bytes]]
    ) -> asyncio.Future[list[StoredMessage] | None]:
        """:meth:`ingest_many` without the coroutine: queue the messages for the next group commit and
        return a future that completes once they are committed (or fails if the commit fails)."""
        items: list[tuple[str, str, topics.PropertyBag, bytes]] = []
        for properties, body in messages:  # (a loop, not a comprehension: one frame less per batch)
            if len(body) > MAX_MESSAGE_BYTES:
                raise _too_large(len(body))
            items.append((hub, device_id, properties, body))
        waiter = _IngestWaiter(
            asyncio.get_running_loop().create_future(), len(self._ingest_items), len(messages), False
        )
        self._queue_ingest(items, waiter)
        return waiter.future

    def _queue_ingest(
        self, items: list[tuple[str, str, topics.PropertyBag, bytes]], waiter: _IngestWaiter
    ) -> None:
        if not self._ingest_items:
            # Group commit: at most one commit per COMMIT_INTERVAL; whatever arrives meanwhile (from
            # any device) joins it.  Under a steady trickle this turns many tiny transactions into a few
            # larger ones at the price of a few milliseconds before the PUBACK.
            loop = asyncio.get_running_loop()
            wait = self._last_commit + COMMIT_INTERVAL - loop.time()
            if wait > 0:
                loop.call_later(wait, self._flush_ingest)
            else:
                loop.call_soon(self._flush_ingest)
        if self._d2c is not None and items:
            shaping = self._d2c.delay(items[0][0], len(items))
            if shaping > 0:
                waiter.release_at = asyncio.get_running_loop().time() + shaping
        self._ingest_items += items
        self._ingest_waiters.append(waiter)

    def _flush_ingest(self) -> None:
        """One transaction for everything queued since the last flush; each waiter is released only
        after the commit (durable before acknowledged)."""
        items, self._ingest_items = self._ingest_items, []
        waiters, self._ingest_waiters = self._ingest_waiters, []
        if not items:
            return
        self._last_commit = asyncio.get_running_loop().time()
        try:
            first, enqueued = self.telemetry.insert(items)
        except Exception as exc:  # the whole batch failed: nobody gets a PUBACK
            log.exception("telemetry commit failed")
            error = HubError(500, "ServerError", 500001, f"telemetry not stored: {exc}")
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(error)
            return
        # Message objects only for the callers that take them (``ingest``): the endpoint's batches do
        # not (their future only says "committed"), nor do the listeners.
        for waiter in waiters:
            if waiter.future.done():
                continue
            if waiter.wants_messages:
                _settle(
                    waiter,
                    [
                        _stored(first + i, enqueued, items[i])
                        for i in range(waiter.start, waiter.start + waiter.count)
                    ],
                )
            else:
                _settle(waiter, None)
        for listener in self._telemetry_listeners:
            for hub, device_id, _, _ in items:
                listener(hub, device_id)

    def recent_messages(self, hub: str, device_id: str, limit: int) -> list[dict[str, Any]]:
        if self.registry.get_device(hub, device_id) is None and not self.telemetry.recent(
            hub=hub, device_id=device_id, limit=1
        ):
            raise _not_found(device_id)
        return [m.to_json() for m in self.telemetry.recent(hub=hub, device_id=device_id, limit=limit)]

    def messages_after(self, hub: str, seq: int, limit: int) -> list[dict[str, Any]]:
        """The hub's messages with a sequence number above ``seq``, oldest first (tailing over REST)."""
        return [m.to_json() for m in self.telemetry.after(seq, hub=hub, limit=limit)]

    # ------------------------------------------------------------------------------ cloud-to-device
    async def send_c2d(self, hub: str, device_id: str, message: C2dMessage) -> None:
        """Queue a cloud-to-device message for ``device_id`` of ``hub``; returns once it is committed
        (and sent, when the device is connected and subscribed).  Raises ``C2dRefused`` (unknown device,
        full queue, too large, malformed), having queued nothing."""
        self.c2d.send(hub, device_id, message, self._channels.get((hub, device_id)))

    def subscribed(self, hub: str, device_id: str) -> None:
        """The device's connection gained subscriptions: send what is queued for it."""
        channel = self._channels.get((hub, device_id))
        if channel is not None:
            self.c2d.deliver(hub, device_id, channel)

    def purge_c2d(self, hub: str, device_id: str) -> dict[str, Any]:
        """``DELETE /devices/{id}/commands``: Azure's PurgeMessageQueueResult."""
        if self.registry.get_device(hub, device_id) is None:
            raise _not_found(device_id)
        purged = self.c2d.purge(hub, device_id)
        return {"deviceId": device_id, "moduleId": None, "totalMessagesPurged": purged}

    # ---------------------------------------------------------------------------------- direct methods
    async def invoke_method(self, hub: str, device_id: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, Mapping):
            raise _invalid("method invocation body must be a JSON object")
        name = body.get("methodName")
        if not isinstance(name, str) or not name or len(name) > 100:
            raise _invalid("methodName must be a non-empty string")
        response_timeout = _timeout(body.get("responseTimeoutInSeconds"), METHOD_TIMEOUT_DEFAULT, "response")
        connect_timeout = _timeout(body.get("connectTimeoutInSeconds"), 0, "connect")
        payload = json.dumps(body.get("payload")).encode("utf-8")
        if len(payload) > METHOD_PAYLOAD_MAX_BYTES:
            raise HubError(413, "MessageTooLarge", 413001, "method payload exceeds 128 KB")
        if self.registry.get_device(hub, device_id) is None:
            raise _not_found(device_id)
        topic_probe = topics.method_request_topic(name, "0")
        channel = await self._wait_for_method_channel(hub, device_id, topic_probe, connect_timeout)
        if channel is None:
            raise HubError(
                404, "DeviceNotOnline", 404103, f"Timed out waiting for device {device_id} to connect."
            )
        rid = uuid.uuid4().hex
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._pending_methods[rid] = _PendingMethod(hub, device_id, future)
        try:
            await asyncio.wait_for(channel.publish(topics.method_request_topic(name, rid), payload, 0), 5)
            status, result = await asyncio.wait_for(future, response_timeout)
        except TimeoutError as exc:
            raise HubError(
                504,
                "GatewayTimeoutException",
                504101,
                f"Timed out waiting for the response from device {device_id}.",
            ) from exc
        finally:
            self._pending_methods.pop(rid, None)
        return {"status": status, "payload": result}

    async def _wait_for_method_channel(
        self, hub: str, device_id: str, probe: str, connect_timeout: float
    ) -> DeviceChannel | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout
        while True:
            channel = self._channels.get((hub, device_id))
            if channel is not None and channel.is_subscribed(probe):
                return channel
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.1)

    def method_response(self, hub: str, device_id: str, status: int, rid: str, payload: bytes) -> None:
        pending = self._pending_methods.get(rid)
        if pending is None or (pending.hub, pending.device_id) != (hub, device_id) or pending.future.done():
            return  # late, unknown or someone else's: Azure drops it too
        result: Any
        try:
            result = jsonsafe.loads(payload) if payload else None
        except jsonsafe.JsonRefused:  # not JSON we would pass on: the service gets the text
            result = payload.decode("utf-8", errors="replace")
        pending.future.set_result((status, result))

    async def close(self) -> None:
        for pending in self._pending_methods.values():
            if not pending.future.done():
                pending.future.cancel()
        self._pending_methods.clear()
        with contextlib.suppress(Exception):
            self._channels.clear()


def _timeout(value: Any, default: int, what: str) -> float:
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"{what}TimeoutInSeconds must be a number")
    if what == "response" and not METHOD_TIMEOUT_MIN <= value <= METHOD_TIMEOUT_MAX:
        raise _invalid(
            f"responseTimeoutInSeconds must be between {METHOD_TIMEOUT_MIN} and {METHOD_TIMEOUT_MAX}"
        )
    if what == "connect" and not 0 <= value <= METHOD_TIMEOUT_MAX:
        raise _invalid(f"connectTimeoutInSeconds must be between 0 and {METHOD_TIMEOUT_MAX}")
    return float(value)
