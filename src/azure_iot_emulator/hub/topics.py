"""IoT Hub device MQTT names, pure: CONNECT usernames, topic parsing and building, the property bag.

Topic reference (azure-iot-device 2.14 and Azure's MQTT documentation)::

    C->S devices/{id}/messages/events/{property bag}           telemetry
    C->S $iothub/twin/GET/?$rid={rid}                           twin GET
    C->S $iothub/twin/PATCH/properties/reported/?$rid={rid}    reported patch
    C->S $iothub/methods/res/{status}/?$rid={rid}               direct method response
    S->C $iothub/twin/res/{status}/?$rid={rid}[&$version={v}]   twin responses
    S->C $iothub/twin/PATCH/properties/desired/?$version={v}    desired patch
    S->C $iothub/methods/POST/{name}/?$rid={rid}                direct method request
    S->C devices/{id}/messages/devicebound/{property bag}      cloud-to-device message
"""

from __future__ import annotations

import functools
import json
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field

# Property-bag keys the hub treats as system properties, and the names it gives them.
SYSTEM_PROPERTIES = {
    "$.mid": "messageId",
    "$.cid": "correlationId",
    "$.uid": "userId",
    "$.ct": "contentType",
    "$.ce": "contentEncoding",
    "$.ifid": "interfaceId",
    "$.exp": "expiryTimeUtc",
    "$.on": "outputName",
    "$.to": "to",
    "$.schema": "messageSchema",
    "$.ctime": "creationTimeUtc",
}

SUBSCRIBABLE_FIXED = (
    "$iothub/twin/res/#",
    "$iothub/twin/PATCH/properties/desired/#",
    "$iothub/methods/POST/#",
)
DESIRED_FILTER = "$iothub/twin/PATCH/properties/desired/#"
METHODS_FILTER = "$iothub/methods/POST/#"
TWIN_RESPONSE_FILTER = "$iothub/twin/res/#"


@dataclass(frozen=True)
class HubUsername:
    host: str
    device_id: str
    module_id: str | None
    api_version: str | None


def parse_username(username: str | None) -> HubUsername | None:
    """``{hubhost}/{deviceid}[/{moduleid}]/?api-version=...`` -> parts, or ``None`` if not a hub
    username (DPS usernames are ``{scope}/registrations/{id}/...``)."""
    if not username or "/?" not in username:
        return None
    path, _, query = username.partition("/?")
    parts = path.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        return None
    params = parse_query(query)
    return HubUsername(
        host=parts[0],
        device_id=parts[1],
        module_id=parts[2] if len(parts) == 3 else None,
        api_version=params.get("api-version"),
    )


def parse_query(query: str) -> dict[str, str]:
    """``a=1&b=x%20y`` -> dict; a segment without ``=`` maps to ``""``."""
    result: dict[str, str] = {}
    for segment in query.split("&"):
        if not segment:
            continue
        key, _, value = segment.partition("=")
        result[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    return result


# ------------------------------------------------------------------------------------------- property bag
@dataclass(frozen=True)
class PropertyBag:
    system: dict[str, str] = field(default_factory=dict)
    application: dict[str, str] = field(default_factory=dict)

    @functools.cached_property
    def system_json(self) -> str:
        return json.dumps(self.system)

    @functools.cached_property
    def application_json(self) -> str:
        return json.dumps(self.application)


@functools.lru_cache(maxsize=4096)
def decode_property_bag(bag: str) -> PropertyBag:
    """(Cached: a device sends the same few property bags over and over; treat the result as read-only.)
    Split a URL-encoded property bag into system properties (by Azure's name) and application
    properties.  Later duplicates win, like the hub."""
    system: dict[str, str] = {}
    application: dict[str, str] = {}
    for key, value in parse_query(bag).items():
        if key in SYSTEM_PROPERTIES:
            system[SYSTEM_PROPERTIES[key]] = value
        elif key:
            application[key] = value
    return PropertyBag(system, application)


def encode_property_bag(bag: PropertyBag) -> str:
    """The inverse of :func:`decode_property_bag` (used for C2D-style topics and tests)."""
    reverse = {name: key for key, name in SYSTEM_PROPERTIES.items()}
    pairs = [(reverse[name], value) for name, value in bag.system.items()]
    pairs += sorted(bag.application.items())
    return _encode_pairs(pairs)


def _encode_pairs(pairs: Iterable[tuple[str, str]]) -> str:
    """``key=value&...``, both sides URL-encoded whole (``$`` as ``%24``, ``/`` as ``%2F``), as Azure does."""
    return "&".join(
        f"{urllib.parse.quote(key, safe='')}={urllib.parse.quote(value, safe='')}" for key, value in pairs
    )


# ----------------------------------------------------------------------------------------- device publish
@dataclass(frozen=True)
class Telemetry:
    properties: PropertyBag


@dataclass(frozen=True)
class TwinGet:
    rid: str


@dataclass(frozen=True)
class TwinReportedPatch:
    rid: str


@dataclass(frozen=True)
class MethodResponse:
    status: int
    rid: str


@dataclass(frozen=True)
class Forbidden:
    """A topic this device may not publish to (another device's topics, unknown, or malformed)."""

    why: str


DevicePublish = Telemetry | TwinGet | TwinReportedPatch | MethodResponse | Forbidden


def _rid(query: str) -> str | None:
    rid = parse_query(query).get("$rid")
    return rid or None


_EVENTS = "/messages/events"


def telemetry_properties(device_id: str, topic: str) -> PropertyBag | None:
    """The property bag of a telemetry PUBLISH (``devices/{device_id}/messages/events[/{bag}]``), or None
    when ``topic`` is not this device's telemetry topic: :func:`classify_publish`'s answer for the topic
    nearly every message has, without building a string or an object per message."""
    end = 8 + len(device_id)  # after "devices/{device_id}"
    if not topic.startswith(device_id, 8) or not topic.startswith(_EVENTS, end):
        return None
    if not topic.startswith("devices/"):
        return None
    end += len(_EVENTS)
    if len(topic) == end:
        return decode_property_bag("")
    if topic[end] != "/":
        return None
    return decode_property_bag(topic[end + 1 :])


def classify_publish(device_id: str, topic: str) -> DevicePublish:
    """What a PUBLISH from ``device_id`` to ``topic`` means."""
    properties = telemetry_properties(device_id, topic)
    if properties is not None:
        return Telemetry(properties)
    if topic.startswith("devices/"):
        return Forbidden(f"topic {topic!r} does not belong to device {device_id!r}")
    path, sep, query = topic.partition("?")
    if path == "$iothub/twin/GET/":
        rid = _rid(query)
        return TwinGet(rid) if sep and rid else Forbidden("twin GET without $rid")
    if path == "$iothub/twin/PATCH/properties/reported/":
        rid = _rid(query)
        return TwinReportedPatch(rid) if sep and rid else Forbidden("reported patch without $rid")
    if path.startswith("$iothub/methods/res/"):
        status_text = path[len("$iothub/methods/res/") :].rstrip("/")
        rid = _rid(query)
        if not (status_text.isdigit() and rid):
            return Forbidden("method response needs an integer status and a $rid")
        return MethodResponse(int(status_text), rid)
    if path.startswith("$iothub/twin/PATCH/properties/desired"):
        return Forbidden("desired properties can only be written by the service")
    return Forbidden(f"topic {topic!r} is not an IoT Hub device topic")


def may_subscribe(device_id: str, topic_filter: str) -> bool:
    return topic_filter in SUBSCRIBABLE_FIXED or is_c2d_filter(device_id, topic_filter)


def is_c2d_filter(device_id: str, topic_filter: str) -> bool:
    """The filters through which a device receives its cloud-to-device messages."""
    return topic_filter in (
        f"devices/{device_id}/messages/devicebound/#",
        f"devices/{device_id}/messages/devicebound/",
    )


# ------------------------------------------------------------------------------------------------- build
def twin_response_topic(status: int, rid: str, version: int | None = None) -> str:
    topic = f"$iothub/twin/res/{status}/?$rid={urllib.parse.quote(rid, safe='')}"
    if version is not None:
        topic += f"&$version={version}"
    return topic


def desired_patch_topic(version: int) -> str:
    return f"$iothub/twin/PATCH/properties/desired/?$version={version}"


def method_request_topic(method_name: str, rid: str) -> str:
    name = urllib.parse.quote(method_name, safe="")
    return f"$iothub/methods/POST/{name}/?$rid={urllib.parse.quote(rid, safe='')}"


def c2d_topic(device_id: str, properties: Iterable[tuple[str, str]]) -> str:
    """Where a cloud-to-device message reaches a device: ``devices/{id}/messages/devicebound/`` and the
    message's property bag (``devices/{id}/messages/devicebound/`` alone matches the device's
    subscription, whatever the bag)."""
    return f"devices/{device_id}/messages/devicebound/{_encode_pairs(properties)}"
