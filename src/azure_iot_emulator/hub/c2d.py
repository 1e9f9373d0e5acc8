"""Cloud-to-device messages: what a service hands the hub, Azure's rules for them, and how the hub refuses.

The hub's AMQP side (``/messages/devicebound``, where azure-iot-hub's ``send_c2d_message`` arrives)
turns each AMQP message into a :class:`C2dMessage` and calls ``HubService.send_c2d(hub, device_id,
message)``; when that raises :class:`C2dRefused`, the AMQP delivery is rejected with its ``condition``
and ``description`` (the conditions Azure answers with, which the service SDKs translate: Node's
azure-iothub maps ``amqp:not-found`` to DeviceNotFoundError, ``amqp:resource-limit-exceeded`` to
DeviceMaximumQueueDepthExceededError, ``amqp:link:message-size-exceeded`` to MessageTooLargeError).
Once ``send_c2d`` returns, the message is committed to the device's queue (``c2d_queue.py``).

Azure's limits (IoT Hub quotas and the C2D messaging guide): at most 50 messages queued per device
(DeviceMaximumQueueDepthExceeded, 403004), at most 64 KB per message, body and properties together
(MessageTooLarge, 413001), a time to live of the hub's default (1 hour unless configured) when the
sender sets no expiry and never more than 2 days, a message id of at most 128 characters of the device
id's alphabet, and a delivery count after which an undelivered message is dropped (dead-lettered;
the hub setting ``maxDeliveryCount``, default 10).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from azure_iot_emulator import ids
from azure_iot_emulator.hub import topics
from azure_iot_emulator.hub.timefmt import azure_time

# AMQP error conditions Azure answers a refused cloud-to-device message with.
NOT_FOUND = "amqp:not-found"
QUEUE_FULL = "amqp:resource-limit-exceeded"
TOO_LARGE = "amqp:link:message-size-exceeded"
ARGUMENT_ERROR = "com.microsoft:argument-error"
INTERNAL_ERROR = "amqp:internal-error"

MAX_QUEUE_DEPTH = 50
MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_TTL_SECONDS = 3600
MAX_TTL_SECONDS = 2 * 24 * 3600
DEFAULT_MAX_DELIVERY_COUNT = 10
MAX_DELIVERY_COUNT = 100
MAX_TOPIC_BYTES = 65535  # an MQTT topic name's length field: the property bag travels in the topic

ACK_VALUES = ("none", "positive", "negative", "full")
ACK_PROPERTY = "iothub-ack"


@dataclass(frozen=True)
class C2dMessage:
    body: bytes
    message_id: str | None = None
    correlation_id: str | None = None
    user_id: str | None = None
    expiry: datetime | None = None
    """The sender's absolute expiry time (AMQP ``absolute-expiry-time``); None: the hub's default TTL."""
    ack: str | None = None
    """The ``iothub-ack`` application property: none, positive, negative or full."""
    properties: dict[str, str] = field(default_factory=dict)
    """The other application properties."""
    content_type: str | None = None
    content_encoding: str | None = None


class C2dRefused(Exception):
    """A cloud-to-device message the hub does not accept; nothing was queued."""

    def __init__(self, condition: str, description: str) -> None:
        super().__init__(f"{condition}: {description}")
        self.condition = condition
        self.description = description


@dataclass(frozen=True)
class C2dLimits:
    """The hub settings Azure lets an owner change (``cloudToDevice`` of the hub's properties)."""

    default_ttl: float = DEFAULT_TTL_SECONDS
    """Seconds a message lives when its sender set no expiry (1 s to 2 days)."""
    max_delivery_count: int = DEFAULT_MAX_DELIVERY_COUNT
    """Deliveries without an acknowledgement after which a message is dropped (1-100)."""

    def validated(self) -> C2dLimits:
        if not 1 <= self.default_ttl <= MAX_TTL_SECONDS:
            raise ValueError(f"the C2D default TTL must be 1 to {MAX_TTL_SECONDS} seconds (2 days)")
        if not 1 <= self.max_delivery_count <= MAX_DELIVERY_COUNT:
            raise ValueError(f"the C2D max delivery count must be 1 to {MAX_DELIVERY_COUNT}")
        return self


def device_not_found(device_id: str) -> C2dRefused:
    return C2dRefused(NOT_FOUND, f"DeviceNotFound (404001): device {device_id!r} is not registered")


def queue_full(device_id: str) -> C2dRefused:
    return C2dRefused(
        QUEUE_FULL,
        f"DeviceMaximumQueueDepthExceeded (403004): device {device_id!r} already has "
        f"{MAX_QUEUE_DEPTH} messages queued",
    )


def _argument(text: str) -> C2dRefused:
    return C2dRefused(ARGUMENT_ERROR, f"ArgumentInvalid (400004): {text}")


def wire_properties(device_id: str, message: C2dMessage) -> list[tuple[str, str]]:
    """The message's property bag as the device gets it (Azure's keys and order: system properties,
    ``iothub-ack``, then the application properties as the sender gave them)."""
    system = (
        ("$.mid", message.message_id),
        ("$.cid", message.correlation_id),
        ("$.uid", message.user_id),
        ("$.to", f"/devices/{device_id}/messages/deviceBound"),
        ("$.exp", azure_time(message.expiry) if message.expiry is not None else None),
        ("$.ct", message.content_type),
        ("$.ce", message.content_encoding),
        (ACK_PROPERTY, message.ack),
    )
    return [(key, value) for key, value in system if value is not None] + list(message.properties.items())


def message_size(message: C2dMessage) -> int:
    """What counts against the 64 KB: the body and every property name and value, UTF-8 encoded."""
    texts = [
        message.message_id,
        message.correlation_id,
        message.user_id,
        message.content_type,
        message.content_encoding,
        message.ack,
    ]
    for name, value in message.properties.items():
        texts += [name, value]
    return len(message.body) + sum(len(text.encode("utf-8")) for text in texts if text is not None)


_RESERVED = frozenset((*topics.SYSTEM_PROPERTIES, ACK_PROPERTY))


def check(device_id: str, message: C2dMessage) -> None:
    """Everything about ``message`` that can be refused without looking at the queue; raises
    :class:`C2dRefused`."""
    if not ids.is_device_id(device_id):
        raise _argument(f"invalid device id {device_id!r}: {ids.DEVICE_ID_RULE}")
    if not isinstance(message.body, bytes):
        raise _argument("the message body must be bytes")
    if message.message_id is not None and not ids.is_message_id(message.message_id):
        raise _argument(f"invalid message id {message.message_id!r}: {ids.MESSAGE_ID_RULE}")
    if message.ack is not None and message.ack not in ACK_VALUES:
        raise _argument(f"{ACK_PROPERTY} must be one of {', '.join(ACK_VALUES)}, not {message.ack!r}")
    if message.expiry is not None and message.expiry.tzinfo is None:
        raise _argument("the expiry time must carry a time zone")
    for name, value in message.properties.items():
        if not isinstance(name, str) or not isinstance(value, str) or not name:
            raise _argument("application properties must be non-empty names with string values")
        if name in _RESERVED:
            raise _argument(f"application property {name!r} is reserved for a system property")
    for text in (message.correlation_id, message.user_id, message.content_type, message.content_encoding):
        if text is not None and not isinstance(text, str):
            raise _argument("system properties must be strings")
    size = message_size(message)
    if size > MAX_MESSAGE_BYTES:
        raise C2dRefused(
            TOO_LARGE, f"MessageTooLarge (413001): {size} bytes exceed the {MAX_MESSAGE_BYTES} bytes allowed"
        )
    topic = topics.c2d_topic(device_id, wire_properties(device_id, message))
    if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise C2dRefused(
            TOO_LARGE,
            "MessageTooLarge (413001): the properties, URL-encoded into the MQTT topic, exceed "
            f"{MAX_TOPIC_BYTES} bytes",
        )


def expires_at(message: C2dMessage, now: datetime, limits: C2dLimits) -> datetime:
    """When the message is dropped if not delivered: the sender's expiry, never more than 2 days away;
    without one, the hub's default TTL."""
    if message.expiry is None:
        return now + timedelta(seconds=limits.default_ttl)
    return min(message.expiry, now + timedelta(seconds=MAX_TTL_SECONDS))
