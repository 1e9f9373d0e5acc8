"""Message routes to a hub's built-in endpoint (pure: no I/O).

On Azure, routes belong to the hub's resource (the management plane, ARM's ``properties.routing``), not
to its service API; the emulator takes them from its settings (``config.py``) and checks them at start.
A route has a name (1-64 letters, digits, ``.``, ``_``, ``-``; unique in its hub), a source, a condition,
an endpoint (only ``events``, the built-in endpoint, is emulated) and ``enabled``.

Sources and what the built-in endpoint then gets, with the ``iothub-message-source`` Azure stamps:

- ``DeviceMessages``: device-to-cloud messages (``Telemetry``);
- ``TwinChangeEvents``: ``twinChangeEvents`` (``opType`` ``updateTwin`` / ``replaceTwin``);
- ``DeviceLifecycleEvents``: ``deviceLifecycleEvents`` (``createDeviceIdentity`` / ``deleteDeviceIdentity``);
- ``DeviceConnectionStateEvents``: ``deviceConnectionStateEvents`` (``deviceConnected`` /
  ``deviceDisconnected``).

Device messages, as Azure routes them: a hub without routes sends every one to the built-in endpoint
(through its fallback route, enabled by default).  Once a hub has routes, a device message reaches the
built-in endpoint when an enabled ``DeviceMessages`` route's condition is true for it, or, when no such
route's condition is, through the fallback route if that is enabled; once at most, however many routes
match.  The hub's own notifications reach it only through an enabled route of their source whose condition
is true (the fallback route carries device messages only): a hub without such routes emits none.

Conditions are IoT Hub's routing query language, the subset of ``query.py``: ``true``, ``false``,
comparisons, ``IN``, ``IS_DEFINED()``, ``AND``/``OR``/``NOT`` and parentheses over application properties
(by name, e.g. ``level = 'alert'``), system properties (``$contentType``, ``$contentEncoding``,
``$messageId``, ``$correlationId``, ``$userId``, ``$to``, ``$connectionDeviceId``) and the body
(``$body.a.b``, when the message's content type is ``application/json`` and its encoding UTF-8, -16 or
-32, as Azure requires).  Anything else (``$twin``, ``$enqueuedTime``, functions) is refused at start.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonsafe
from azure_iot_emulator.hub.query import Predicate, QueryError, parse_condition
from azure_iot_emulator.hub.topics import PropertyBag

DEVICE_MESSAGES = "DeviceMessages"
TWIN_CHANGE_EVENTS = "TwinChangeEvents"
DEVICE_LIFECYCLE_EVENTS = "DeviceLifecycleEvents"
DEVICE_CONNECTION_STATE_EVENTS = "DeviceConnectionStateEvents"
SOURCES = (DEVICE_MESSAGES, TWIN_CHANGE_EVENTS, DEVICE_LIFECYCLE_EVENTS, DEVICE_CONNECTION_STATE_EVENTS)
_NOT_EMULATED = ("ModuleLifecycleEvents", "DigitalTwinChangeEvents", "DeviceJobLifecycleEvents", "Invalid")
BUILTIN_ENDPOINT = "events"
MAX_ROUTES_PER_HUB = 100  # Azure's limit for paid hubs
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ROUTE_KEYS = frozenset(("name", "source", "condition", "endpoint", "enabled", "hub"))

# The system properties a condition may name (``$`` + Azure's name; as the hub stores them).
_SYSTEM_FIELDS = frozenset(
    ("messageId", "correlationId", "userId", "to", "contentType", "contentEncoding", "connectionDeviceId")
)
_JSON_ENCODINGS = frozenset(("utf-8", "utf-16", "utf-32"))


class RouteError(ValueError):
    """A route the emulator cannot take; the message names the route and what is wrong."""


@dataclass(frozen=True)
class RouteSpec:
    """A route as the settings give it; ``hub`` None: every hub of the emulator."""

    name: str
    source: str
    condition: str = "true"
    endpoint: str = BUILTIN_ENDPOINT
    enabled: bool = True
    hub: str | None = None


@dataclass(frozen=True)
class Route:
    name: str
    source: str
    condition: str
    matches: Predicate
    enabled: bool = True


def _check_field(name: str) -> None:
    if not name.startswith("$"):
        return  # an application property
    head = name[1:].split(".", 1)[0]
    if head == "body":
        if name == "$body":
            raise QueryError("$body needs a field ($body.temperature)")
        return
    if head in _SYSTEM_FIELDS:
        if "." in name:
            raise QueryError(f"{name}: a system property has no fields")
        return
    if head == "twin":
        raise QueryError("routing on the device twin ($twin...) is not emulated")
    raise QueryError(
        f"{name} is not a system property routes can use here "
        f"({', '.join('$' + f for f in sorted(_SYSTEM_FIELDS))}, $body.<field>)"
    )


def compile_route(spec: RouteSpec) -> Route:
    """Check a route's own fields (not its hub) and compile its condition; :class:`RouteError` otherwise."""
    what = f"route {spec.name!r}"
    if not isinstance(spec.name, str) or _NAME.fullmatch(spec.name) is None:
        raise RouteError(f"route name {spec.name!r}: 1-64 letters, digits, '.', '_' or '-'")
    if spec.source not in SOURCES:
        if spec.source in _NOT_EMULATED:
            raise RouteError(f"{what}: source {spec.source} is not emulated (one of {', '.join(SOURCES)})")
        raise RouteError(f"{what}: unknown source {spec.source!r} (one of {', '.join(SOURCES)})")
    if spec.endpoint != BUILTIN_ENDPOINT:
        raise RouteError(
            f"{what}: endpoint {spec.endpoint!r} is not emulated: only the built-in endpoint "
            f"{BUILTIN_ENDPOINT!r}"
        )
    if not isinstance(spec.enabled, bool):
        raise RouteError(f"{what}: enabled must be true or false")
    try:
        matches = parse_condition(spec.condition, _check_field)
    except QueryError as exc:
        raise RouteError(f"{what}: condition {spec.condition!r}: {exc}") from None
    return Route(spec.name, spec.source, spec.condition, matches, spec.enabled)


def parse_route_flag(text: str) -> RouteSpec:
    """``[HUB/]NAME:SOURCE[:CONDITION]`` (the ``--route`` flag): an enabled route to ``events``."""
    head, sep, rest = text.partition(":")
    hub: str | None = None
    if "/" in head:
        hub, _, head = head.rpartition("/")
    source, _, condition = rest.partition(":")
    if not sep or not head or not source:
        raise RouteError(f"route {text[:80]!r}: expected [HUB/]NAME:SOURCE[:CONDITION]")
    return RouteSpec(head, source.strip(), condition.strip() or "true", hub=hub or None)


def route_from_table(item: Any) -> RouteSpec:
    """A route of the settings file: ``{name, source, condition?, endpoint?, enabled?, hub?}``."""
    if isinstance(item, str):
        return parse_route_flag(item)
    if not isinstance(item, Mapping):
        raise RouteError(f"a route must be a table/object, not {item!r:.80}")
    unknown = sorted(set(item) - _ROUTE_KEYS)
    if unknown:
        raise RouteError(f"route {item.get('name')!r}: unknown keys {unknown} (known: {sorted(_ROUTE_KEYS)})")
    for key in ("name", "source", "condition", "endpoint", "hub"):
        if key in item and not isinstance(item[key], str):
            raise RouteError(f"route {item.get('name')!r}: {key} must be a string")
    if "name" not in item or "source" not in item:
        raise RouteError(f"route {item.get('name')!r}: name and source are required")
    return RouteSpec(
        item["name"],
        item["source"],
        item.get("condition", "true"),
        item.get("endpoint", BUILTIN_ENDPOINT),
        item.get("enabled", True),
        item.get("hub"),
    )


@dataclass(frozen=True)
class HubRoutes:
    """One hub's routes and whether its fallback route is enabled."""

    routes: tuple[Route, ...] = ()
    fallback: bool = True
    _enabled: dict[str, tuple[Route, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        enabled = {
            source: tuple(r for r in self.routes if r.enabled and r.source == source) for source in SOURCES
        }
        object.__setattr__(self, "_enabled", enabled)

    def _of(self, source: str) -> tuple[Route, ...]:
        return self._enabled[source]

    @property
    def all_device_messages(self) -> bool:
        """Every device message goes to the built-in endpoint (no routes, the fallback route enabled)."""
        return self.fallback and not self.routes

    def takes(self, source: str) -> bool:
        """Some enabled route has this source (a notification worth building)."""
        return bool(self._of(source))

    def device_message(self, row: Mapping[str, Any]) -> bool:
        """Whether a device message (its condition row) reaches the built-in endpoint."""
        if self.all_device_messages:
            return True
        if any(route.matches(row) is True for route in self._of(DEVICE_MESSAGES)):
            return True
        return self.fallback

    def notification(self, source: str, row: Mapping[str, Any]) -> bool:
        """Whether one of the hub's notifications of ``source`` reaches the built-in endpoint."""
        return any(route.matches(row) is True for route in self._of(source))


def build_routing(
    specs: Sequence[RouteSpec], fallback_hubs: Sequence[str] | None, hub_hosts: Sequence[str]
) -> dict[str, HubRoutes]:
    """Every hub's routes (a spec without a hub applies to each), the fallback route enabled on the
    ``fallback_hubs`` (None: every hub).  :class:`RouteError` for a bad route, an unknown hub, a name used
    twice in a hub or more than Azure's 100 routes in one."""
    hosts = {host.lower(): host for host in hub_hosts}
    per_hub: dict[str, list[Route]] = {host: [] for host in hub_hosts}
    for spec in specs:
        route = compile_route(spec)
        if spec.hub is None:
            targets = list(hub_hosts)
        elif spec.hub.lower() in hosts:
            targets = [hosts[spec.hub.lower()]]
        else:
            raise RouteError(
                f"route {spec.name!r}: {spec.hub!r} is not one of the hubs ({', '.join(hub_hosts)})"
            )
        for host in targets:
            if any(r.name.lower() == route.name.lower() for r in per_hub[host]):
                raise RouteError(f"route {route.name!r} is defined twice for hub {host}")
            per_hub[host].append(route)
    fallback: set[str] = set(hub_hosts)
    if fallback_hubs is not None:
        unknown = [h for h in fallback_hubs if h.lower() not in hosts]
        if unknown:
            raise RouteError(
                f"fallback route: {', '.join(unknown)} not among the hubs ({', '.join(hub_hosts)})"
            )
        fallback = {hosts[h.lower()] for h in fallback_hubs}
    for host, routes in per_hub.items():
        if len(routes) > MAX_ROUTES_PER_HUB:
            raise RouteError(f"hub {host} has {len(routes)} routes: Azure allows {MAX_ROUTES_PER_HUB}")
    return {host: HubRoutes(tuple(per_hub[host]), host in fallback) for host in hub_hosts}


# ------------------------------------------------------------------------------------ condition rows
def message_row(device_id: str, properties: PropertyBag, body: bytes) -> dict[str, Any]:
    """What a route's condition sees of a device message: its application properties by name, its system
    properties as ``$name`` (an application property of the same name wins, as on Azure) and its JSON body
    as ``$body`` when it declares one."""
    row: dict[str, Any] = {"$" + name: value for name, value in properties.system.items()}
    row["$connectionDeviceId"] = device_id
    content_type = properties.system.get("contentType", "").split(";", 1)[0].strip().lower()
    encoding = properties.system.get("contentEncoding", "").strip().lower()
    if content_type == "application/json" and encoding in _JSON_ENCODINGS:
        with contextlib.suppress(UnicodeDecodeError, jsonsafe.JsonRefused):  # unreadable: undefined
            row["$body"] = jsonsafe.loads(body.decode(encoding))
    row.update(properties.application)
    return row


def notification_row(
    system: Mapping[str, str], application: Mapping[str, str], device_id: str, body: Any
) -> dict[str, Any]:
    """What a condition sees of one of the hub's notifications (its body is JSON)."""
    row: dict[str, Any] = {"$" + name: value for name, value in system.items()}
    row["$connectionDeviceId"] = device_id
    row["$body"] = body
    row.update(application)
    return row
