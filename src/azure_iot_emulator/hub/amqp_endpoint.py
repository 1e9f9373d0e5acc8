"""The hub's AMQP endpoint on port 5671 of its address: a thin adapter from AMQP links to the hub.

One :class:`HubAmqpEndpoint` per hub host; each TLS connection gets a :class:`_Connection` (the
``ConnectionHandler`` of ``amqp/connection.py``).  What a link may be, by its address:

- ``$cbs`` (a sender to it, a receiver from it): ``put-token`` with a SharedAccessSignature of one of the
  hub's policies.  Event Hubs' clients sign ``sb://{host}/{entity}...`` with the key's text, IoT Hub's
  service SDK signs ``{host}`` with the decoded key; either must name this hub (a resource under one of its
  names), carry a known policy and not be expired, else ``status-code`` 401.
- ``$management``: ``READ`` of ``com.microsoft:eventhub`` (name, created_at, partition_count,
  partition_ids) and ``com.microsoft:partition`` (begin/last sequence numbers, last offset and enqueued
  time, is_partition_empty), authorised by the request's ``security_token`` or a CBS grant.
- ``{entity}/ConsumerGroups/{group}/Partitions/{id}`` (the client receives): the built-in endpoint's
  events from the selector filter's position on, as the client's credit allows, with Event Hubs'
  annotations (``x-opt-sequence-number``, ``x-opt-offset``, ``x-opt-enqueued-time``) and IoT Hub's
  (``iothub-connection-device-id``, ``iothub-connection-auth-method``,
  ``iothub-connection-auth-generation-id``, ``iothub-enqueuedtime``, ``iothub-message-source``), the
  message's own properties (message id, correlation id, user id, content type and encoding) and its
  application properties.  Needs a CBS grant covering the consumer group.  A receiver with an owner level
  (``com.microsoft:epoch``) takes the partition from receivers with a lower one or none
  (``amqp:link:stolen``); at most 5 receivers without one per partition and consumer group.
- ``/messages/devicebound`` (the client sends, azure-iot-hub's ``send_c2d_message``): each message, sent
  to the device named by its ``to`` (``/devices/{id}/messages/devicebound``), is handed to the hub's
  cloud-to-device queue (``HubService.send_c2d``); the delivery is accepted once the message is
  committed there, rejected with the queue's AMQP condition (:class:`C2dRefused`) otherwise.  Needs a
  CBS grant covering the hub.  One task per link stores its messages in order (the connection keeps a
  reference until it ends); the link's credit comes back only as they are settled, so a sender has at
  most the credit window (``AmqpConnection``'s ``receive_credit``) waiting to be stored.

Anything else is refused at attach (``amqp:not-found``, ``amqp:unauthorized-access``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from proton import (
    UNDESCRIBED,
    Array,
    Condition,
    Data,
    Delivery,
    Link,
    Message,
    Receiver,
    Sender,
    symbol,
    timestamp,
    ulong,
)

from azure_iot_emulator import ids
from azure_iot_emulator.amqp.connection import INTERNAL_ERROR, AmqpConnection, LinkRefused, settle
from azure_iot_emulator.amqp.nodes import (
    CBS,
    MANAGEMENT,
    SAS_TOKEN_TYPE,
    Grants,
    Reply,
    TokenRefused,
    property_text,
    response,
)
from azure_iot_emulator.hub.c2d import C2dMessage, C2dRefused
from azure_iot_emulator.hub.eventhub.model import Event, PositionError, millis, parse_selector
from azure_iot_emulator.hub.eventhub.service import EventHubError, EventHubService
from azure_iot_emulator.hub.registry import HubRegistry
from azure_iot_emulator.hub.telemetry import TELEMETRY
from azure_iot_emulator.mqtt.tls import Inner, Opener, Peer, TlsProtocol
from azure_iot_emulator.sas import SasError, normalised_resource, parse_sas, resource_allows, verify_sas

log = logging.getLogger(__name__)

SELECTOR_FILTER = "apache.org:selector-filter:string"
EPOCH = symbol("com.microsoft:epoch")
MAX_NON_EPOCH_RECEIVERS = 5  # per partition and consumer group, as Event Hubs allows
READ_BATCH = 100
C2D_ADDRESS = "/messages/devicebound"
_PARTITION_PATH = re.compile(r"([^/]+)/consumergroups/([^/]+)/partitions/([^/]+)", re.IGNORECASE)
_DEVICEBOUND = re.compile(r"/devices/([^/]+)/messages/devicebound", re.IGNORECASE)
_AUTH_TYPES = {"sas": "sas", "selfSigned": "x509Certificate", "certificateAuthority": "x509Ca"}


# ---------------------------------------------------------------------------------- cloud-to-device
class C2dSender(Protocol):
    """Where sent cloud-to-device messages go: the hub service's per-device queue
    (:meth:`HubService.send_c2d`, which raises :class:`C2dRefused` to refuse one)."""

    async def send_c2d(self, hub: str, device_id: str, message: C2dMessage) -> None: ...


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def c2d_from_amqp(message: Message) -> tuple[str, C2dMessage]:
    """(device id, message) from an AMQP message sent to ``/messages/devicebound``; ValueError naming
    what is wrong otherwise."""
    match = _DEVICEBOUND.fullmatch(message.address or "")
    if match is None:
        raise ValueError("the message's 'to' must be /devices/{deviceId}/messages/devicebound")
    device_id = match.group(1)
    if not ids.is_device_id(device_id):
        raise ValueError(f"invalid device id in 'to': {device_id[:130]!r}")
    body = message.body
    if isinstance(body, str):
        body = body.encode("utf-8")
    elif isinstance(body, memoryview):
        body = body.tobytes()
    elif body is None:
        body = b""
    if not isinstance(body, bytes):
        raise ValueError("the message body must be binary data or a string")
    properties: dict[str, str] = {}
    ack = None
    sent: dict[Any, Any] = cast(Any, message).properties or {}
    for key, value in sent.items():
        if str(key) == "iothub-ack":
            ack = _text(value)
        else:
            properties[str(key)] = _text(value) or ""
    expiry = datetime.fromtimestamp(message.expiry_time, tz=UTC) if message.expiry_time else None
    return device_id, C2dMessage(
        body=body,
        message_id=_text(message.id),
        correlation_id=_text(message.correlation_id),
        user_id=_text(message.user_id) or None,
        expiry=expiry,
        ack=ack,
        properties=properties,
        content_type=_text(message.content_type) or None,
        content_encoding=_text(message.content_encoding) or None,
    )


# ------------------------------------------------------------------------------------- events out
def event_message(event: Event, auth: tuple[str, str] | None) -> Message:
    """An event of the built-in endpoint as Azure delivers it (a device message, or one of the hub's
    notifications: those carry no connection authentication annotations)."""
    message = Message()
    message.inferred = True  # bytes -> a data section
    message.body = event.body
    enqueued = timestamp(millis(event.enqueued_time))
    annotations: dict[symbol, Any] = {
        symbol("x-opt-sequence-number"): event.sequence_number,
        symbol("x-opt-offset"): str(event.offset),
        symbol("x-opt-enqueued-time"): enqueued,
        symbol("iothub-connection-device-id"): event.device_id,
        symbol("iothub-enqueuedtime"): enqueued,
        symbol("iothub-message-source"): event.source,
    }
    if auth is not None and event.source == TELEMETRY:
        auth_type, generation = auth
        annotations[symbol("iothub-connection-auth-method")] = json.dumps(
            {"scope": "device", "type": auth_type, "issuer": "iothub", "acceptingIpFilterRule": None},
            separators=(",", ":"),
        )
        annotations[symbol("iothub-connection-auth-generation-id")] = generation
    cast(Any, message).annotations = annotations
    system = event.system_properties
    if "messageId" in system:
        message.id = system["messageId"]
    if "correlationId" in system:
        message.correlation_id = system["correlationId"]
    if "userId" in system:
        message.user_id = system["userId"].encode("utf-8")
    if "contentType" in system:
        message.content_type = system["contentType"]
    if "contentEncoding" in system:
        message.content_encoding = system["contentEncoding"]
    if event.application_properties:
        cast(Any, message).properties = dict(event.application_properties)
    return message


def _strip_host(address: str | None) -> str:
    """A link address without ``amqps://host`` (clients send both forms)."""
    text = address or ""
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() in ("amqps", "amqp", "sb"):
        return "/" + rest.partition("/")[2]
    return text


# ------------------------------------------------------------------------------------------ endpoint
class HubAmqpEndpoint:
    """The AMQP endpoint of one hub (``host``, also known as ``names``)."""

    def __init__(
        self,
        host: str,
        names: tuple[str, ...],
        eventhub: EventHubService,
        registry: HubRegistry,
        keys: Callable[[], dict[str, str]],
        clock: Callable[[], datetime],
        c2d: C2dSender | None = None,
    ) -> None:
        self.host = host
        self.names = tuple(dict.fromkeys(n.lower() for n in (host, *names)))
        self.eventhub = eventhub
        self.registry = registry
        self._keys = keys
        self._clock = clock
        self.c2d = c2d
        self.consumers: dict[tuple[str, int], list[_Consumer]] = {}
        self._connections: set[AmqpConnection] = set()

    def opener(self) -> Opener:
        def open_amqp(tls: TlsProtocol, peer: Peer) -> Inner:
            connection = AmqpConnection(tls, lambda conn: _Connection(self, conn))
            self._connections.add(connection)
            return _Tracked(connection, self._connections)

        return open_amqp

    def close(self) -> None:
        for connection in list(self._connections):
            connection.close("amqp:connection:forced", "the emulator is stopping")

    # ---------------------------------------------------------------------------------- CBS tokens
    def verify_token(self, token: str, token_type: str | None) -> tuple[str, float]:
        """(the resource the token grants, its expiry); :class:`TokenRefused` (401) otherwise."""
        if token_type != SAS_TOKEN_TYPE:
            raise TokenRefused(401, f"InvalidToken: token type {str(token_type)[:60]!r} is not supported")
        try:
            parsed = parse_sas(token)
            keys = {name.lower(): key for name, key in self._keys().items()}
            key = keys.get((parsed.policy or "").lower())
            if key is None:
                raise SasError("WRONG_POLICY", f"no policy {str(parsed.policy)[:60]!r} on this hub")
            # Event Hubs' clients scope their tokens sb://host/...; IoT Hub's the bare host.
            service_bus = parsed.resource.lower().startswith("sb://")
            verify_sas(
                token,
                key_b64=key,
                policy=parsed.policy,
                now=self._clock(),
                resources=None,
                key_as_text=service_bus,
            )
        except SasError as exc:
            raise TokenRefused(401, _cbs_description(exc)) from exc
        resource = normalised_resource(parsed.resource)
        if not any(resource_allows(name, resource) for name in self.names):
            raise TokenRefused(
                401, f"InvalidAudience: the token's audience {parsed.resource[:200]!r} is not this hub"
            )
        return resource, float(parsed.expiry)

    def covers(self, grants: Grants, path: str) -> bool:
        """Whether ``grants`` cover ``path`` (``/entity/...``) under one of the hub's names."""
        now = self._clock().timestamp()
        return any(grants.allows(f"{name}{path}", now) for name in self.names)


def _cbs_description(exc: SasError) -> str:
    return {
        "EXPIRED": "ExpiredToken: The token is expired.",
        "BAD_SIGNATURE": "InvalidSignature: The token has an invalid signature.",
        "WRONG_POLICY": "InvalidPolicy: The token's policy (skn) is not a shared access policy of this hub.",
        "WRONG_AUDIENCE": "InvalidAudience: The token's audience is not this hub.",
    }.get(exc.reason, f"InvalidToken: {exc}")


@dataclass
class _Tracked:
    """The connection as the TLS shell sees it, leaving the endpoint's set when it goes."""

    connection: AmqpConnection
    registry: set[AmqpConnection]

    def data_received(self, data: bytes) -> None:
        self.connection.data_received(data)

    def connection_lost(self) -> None:
        self.registry.discard(self.connection)
        self.connection.connection_lost()

    def pause_writing(self) -> None:
        self.connection.pause_writing()

    def resume_writing(self) -> None:
        self.connection.resume_writing()


# --------------------------------------------------------------------------------------- consumers
@dataclass(eq=False)
class _Consumer:
    endpoint: HubAmqpEndpoint
    connection: AmqpConnection
    link: Sender
    partition: int
    group: str
    next_seq: int
    epoch: int | None
    unwatch: Callable[[], None] = lambda: None
    scheduled: bool = False
    pumping: bool = False
    _auth: dict[str, tuple[str, str] | None] = field(default_factory=dict)

    def wake(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.connection.guarded, _Consumer.pump, self)

    def pump(self) -> None:
        """Send events while the link has credit and the peer reads what it is sent: each batch goes to
        the socket before the next is read, so a client that grants a huge credit and stops reading gets
        a socket buffer's worth (then the shell pauses the connection) and the rest as it reads."""
        self.scheduled = False
        if self.pumping:
            return  # a flush below offered the credit again: this loop takes it
        self.pumping = True
        try:
            self._send_batches()
        finally:
            self.pumping = False

    def _send_batches(self) -> None:
        link, eventhub, hub = self.link, self.endpoint.eventhub, self.endpoint.host
        connection = self.connection
        while link.credit > 0 and connection.writable and not link.state & Link.LOCAL_CLOSED:
            events = eventhub.read(hub, self.partition, self.next_seq, min(link.credit, READ_BATCH))
            if not events:
                break
            for event in events:
                link.send(event_message(event, self._auth_of(event.device_id)))
                self.next_seq = event.sequence_number + 1
            connection.flush()

    def _auth_of(self, device_id: str) -> tuple[str, str] | None:
        if device_id not in self._auth:
            device = self.endpoint.registry.get_device(self.endpoint.host, device_id)
            self._auth[device_id] = (
                (_AUTH_TYPES.get(device.auth_type, device.auth_type), device.generation_id)
                if device
                else None
            )
        return self._auth[device_id]

    def steal(self, description: str) -> None:
        self.unwatch()
        self.link.condition = Condition("amqp:link:stolen", description)
        self.link.close()
        self.connection.flush()


# -------------------------------------------------------------------------------------- connection
class _Connection:
    """What one AMQP connection to the hub's endpoint has opened."""

    def __init__(self, endpoint: HubAmqpEndpoint, connection: AmqpConnection) -> None:
        self.endpoint = endpoint
        self.connection = connection
        self.grants = Grants()
        self.reply_links: dict[str, list[Sender]] = {CBS: [], MANAGEMENT: []}
        self.consumers: dict[Sender, _Consumer] = {}
        self.c2d_links: dict[Receiver, collections.deque[tuple[Delivery, Message]]] = {}
        """Per C2D link, its messages received and not yet settled (at most the credit window)."""
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------------------------- attach
    def link_opening(self, link: Link) -> None:
        if isinstance(link, Sender):
            address = link.remote_source.address or ""
            if address in self.reply_links:
                self.reply_links[address].append(link)
                return
            self._open_consumer(link, _strip_host(address))
            return
        assert isinstance(link, Receiver)
        address = link.remote_target.address or ""
        if address in (CBS, MANAGEMENT):
            return
        if _strip_host(address).lower().rstrip("/") == C2D_ADDRESS:
            if self.endpoint.c2d is None:
                raise LinkRefused("amqp:not-found", "cloud-to-device messages are not served here")
            if not self.endpoint.covers(self.grants, C2D_ADDRESS):
                raise LinkRefused(
                    "amqp:unauthorized-access", "Unauthorized: put a token for this hub on $cbs first"
                )
            self.c2d_links[link] = collections.deque()
            return
        raise LinkRefused("amqp:not-found", f"The messaging entity '{address[:200]}' could not be found.")

    def _open_consumer(self, link: Sender, path: str) -> None:
        endpoint, eventhub = self.endpoint, self.endpoint.eventhub
        match = _PARTITION_PATH.fullmatch(path.strip("/"))
        entity = eventhub.entity(endpoint.host)
        if match is None or match.group(1).lower() != entity.lower():
            raise LinkRefused("amqp:not-found", f"The messaging entity '{path[:200]}' could not be found.")
        if not endpoint.covers(self.grants, f"/{path.strip('/')}"):
            raise LinkRefused(
                "amqp:unauthorized-access", f"Unauthorized: no token on $cbs covers {path[:200]}"
            )
        try:
            group, _ = eventhub.consumer_group(endpoint.host, match.group(2))
            partition = eventhub.partition(endpoint.host, match.group(3))
            position = parse_selector(_selector(link))
        except EventHubError as exc:
            raise LinkRefused(exc.condition, exc.message) from exc
        except PositionError as exc:
            raise LinkRefused("amqp:invalid-field", str(exc)) from exc
        epoch = _epoch(link)
        key = (group.lower(), partition)
        others = endpoint.consumers.setdefault(key, [])
        holders = [c for c in others if c.epoch is not None]
        if holders and (epoch is None or max(h.epoch or 0 for h in holders) > epoch):
            raise LinkRefused(
                "amqp:link:stolen",
                f"a receiver with a higher owner level holds partition {partition}",
            )
        if epoch is None and len(others) >= MAX_NON_EPOCH_RECEIVERS:
            raise LinkRefused(
                "amqp:resource-limit-exceeded",
                f"at most {MAX_NON_EPOCH_RECEIVERS} receivers per partition and consumer group",
            )
        if epoch is not None:
            for other in list(others):
                others.remove(other)
                other.connection.handler.link_closed(other.link)
                other.steal(f"a receiver with owner level {epoch} took partition {partition}")
        consumer = _Consumer(
            endpoint,
            self.connection,
            link,
            partition,
            group,
            eventhub.start_of(endpoint.host, partition, position),
            epoch,
        )
        consumer.unwatch = eventhub.watch(endpoint.host, partition, consumer.wake)
        others.append(consumer)
        self.consumers[link] = consumer

    # ------------------------------------------------------------------------------------ traffic
    def credit(self, link: Sender) -> None:
        consumer = self.consumers.get(link)
        if consumer is not None:
            consumer.pump()

    def link_closed(self, link: Link) -> None:
        for replies in self.reply_links.values():
            if isinstance(link, Sender) and link in replies:
                replies.remove(link)
        self.c2d_links.pop(link, None)  # type: ignore[call-overload]
        consumer = self.consumers.pop(link, None)  # type: ignore[call-overload]
        if consumer is not None:
            consumer.unwatch()
            group = self.endpoint.consumers.get((consumer.group.lower(), consumer.partition), [])
            if consumer in group:
                group.remove(consumer)

    def message(self, link: Receiver, delivery: Delivery, message: Message) -> None:
        address = link.remote_target.address or ""
        if address == CBS:
            settle(delivery, Delivery.ACCEPTED)
            self._answer(CBS, message, self._put_token(message))
        elif address == MANAGEMENT:
            settle(delivery, Delivery.ACCEPTED)
            self._answer(MANAGEMENT, message, self._management(message))
        elif (waiting := self.c2d_links.get(link)) is not None:
            waiting.append((delivery, message))
            if len(waiting) == 1:  # else the link's task is at work and takes this one in its turn
                task = asyncio.get_running_loop().create_task(self._store_c2d(waiting))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        else:
            settle(delivery, Delivery.REJECTED, Condition("amqp:not-allowed", "nothing is received here"))

    def _answer(self, node: str, request: Message, reply: Reply) -> None:
        links = self.reply_links[node]
        target = next((link for link in links if link.remote_target.address == request.reply_to), None)
        target = target or next(iter(links), None)
        if target is None:
            log.info("no reply link for a %s request: answer dropped", node)
            return
        target.send(response(request, reply))

    def _put_token(self, message: Message) -> Reply:
        if property_text(message, "operation") != "put-token":
            return Reply(400, "BadRequest: the only $cbs operation is put-token")
        token = message.body
        if isinstance(token, bytes):
            token = token.decode("utf-8", "replace")
        if not isinstance(token, str):
            return Reply(400, "BadRequest: the token must be a string")
        try:
            resource, expiry = self.endpoint.verify_token(token, property_text(message, "type"))
        except TokenRefused as exc:
            log.info("CBS put-token on %s refused: %s", self.endpoint.host, exc.description)
            return Reply(exc.status, exc.description)
        self.grants.add(resource, expiry)
        return Reply(202, "Accepted")

    def _management(self, message: Message) -> Reply:
        endpoint, eventhub = self.endpoint, self.endpoint.eventhub
        token = property_text(message, "security_token")
        if token is not None:
            try:
                resource, expiry = endpoint.verify_token(token, SAS_TOKEN_TYPE)
            except TokenRefused as exc:
                return Reply(exc.status, exc.description)
            self.grants.add(resource, expiry)
        entity = eventhub.entity(endpoint.host)
        if not endpoint.covers(self.grants, f"/{entity}"):
            return Reply(401, "Unauthorized: no token on $cbs or in security_token covers the entity")
        if property_text(message, "operation") != "READ":
            return Reply(400, "BadRequest: the only $management operation is READ")
        name = property_text(message, "name") or ""
        if name.lower() != entity.lower():
            return Reply(404, f"NotFound: The messaging entity '{name[:200]}' could not be found.")
        kind = property_text(message, "type")
        if kind == "com.microsoft:eventhub":
            info = eventhub.entity_info(endpoint.host)
            return Reply(
                200,
                "OK",
                {
                    "name": info.name,
                    "type": "com.microsoft:eventhub",
                    "created_at": timestamp(millis(info.created)),
                    "partition_count": len(info.partition_ids),
                    "partition_ids": Array(cast(Any, UNDESCRIBED), Data.STRING, *info.partition_ids),
                },
            )
        if kind == "com.microsoft:partition":
            try:
                partition = eventhub.partition(endpoint.host, property_text(message, "partition") or "")
            except EventHubError as exc:
                return Reply(exc.status, f"NotFound: {exc.message}")
            part = eventhub.partition_info(endpoint.host, partition)
            last_time = part.last_enqueued_time or datetime.fromtimestamp(0, tz=UTC)
            return Reply(
                200,
                "OK",
                {
                    "name": entity,
                    "type": "com.microsoft:partition",
                    "partition": str(partition),
                    "begin_sequence_number": part.begin_sequence_number,
                    "last_enqueued_sequence_number": part.last_sequence_number,
                    "last_enqueued_offset": str(part.last_offset),
                    "last_enqueued_time_utc": timestamp(millis(last_time)),
                    "is_partition_empty": part.empty,
                },
            )
        return Reply(400, f"BadRequest: unknown type {str(kind)[:60]!r}")

    async def _store_c2d(self, waiting: collections.deque[tuple[Delivery, Message]]) -> None:
        """Store a link's messages one after the other, in the order they came, each settled (and the
        link's credit topped up) once stored or refused; ends when none is waiting."""
        while waiting:
            delivery, message = waiting[0]
            await self._send_c2d(delivery, message)
            waiting.popleft()
            self.connection.flush()

    async def _send_c2d(self, delivery: Delivery, message: Message) -> None:
        outbox = self.endpoint.c2d
        try:
            device_id, c2d = c2d_from_amqp(message)
        except ValueError as exc:
            settle(delivery, Delivery.REJECTED, Condition("amqp:invalid-field", str(exc)))
            return
        try:
            assert outbox is not None
            await outbox.send_c2d(self.endpoint.host, device_id, c2d)
        except C2dRefused as exc:
            settle(delivery, Delivery.REJECTED, Condition(exc.condition, exc.description))
        except Exception:
            log.exception("cloud-to-device message to %s failed", device_id)
            settle(delivery, Delivery.REJECTED, Condition(INTERNAL_ERROR, "the message was not queued"))
        else:
            settle(delivery, Delivery.ACCEPTED)


def _selector(link: Sender) -> str | None:
    """The selector filter's expression from the source's filter set, if any."""
    filters = link.remote_source.filter
    filters.rewind()
    if filters.next() is None:
        return None
    value = filters.get_object()
    if not isinstance(value, dict):
        return None
    for key, entry in value.items():
        if str(key) != SELECTOR_FILTER:
            continue
        described = getattr(entry, "value", entry)
        return described if isinstance(described, str) else None
    return None


def _epoch(link: Sender) -> int | None:
    properties = link.remote_properties or {}
    value = properties.get(EPOCH)
    if value is None:
        return None
    return int(value) if isinstance(value, int | ulong) else None
