"""The IoT Hub device MQTT endpoint: one per hub host name, plugged into the emulator's MQTT core.

The core owns sockets, TLS, the packet codec, sessions (persisted subscriptions, QoS 1 retries), the
one-connection-per-client-id rule and QoS 2 refusal; this module decides who may connect, what a device
may subscribe to and publish, and what each publish means:

- CONNECT: username ``{hubhost}/{deviceid}/?api-version=...``; client id = device id; the device must
  exist on this hub and be enabled; ``selfSigned`` devices must present a leaf whose SHA-1 or SHA-256
  thumbprint is registered, ``sas`` devices a valid device SAS.  Anything else -> CONNACK 5.
- telemetry is stored durably before the core acknowledges it; over 256 KB closes the connection.
- twin GET / reported PATCH are answered on ``$iothub/twin/res/...`` echoing ``$rid``.
- method responses complete the service's pending invocation.
- cloud-to-device messages go out (``HubService.c2d``) when the device connects with its devicebound
  subscription kept, subscribes, or gets one while connected; its PUBACK takes the message off its queue.
- any other topic (another device's, desired properties, unknown) closes the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from azure_iot_emulator import ids
from azure_iot_emulator.hub import topics
from azure_iot_emulator.hub.service import HubError, HubService
from azure_iot_emulator.hub.telemetry import MAX_MESSAGE_BYTES
from azure_iot_emulator.mqtt.endpoint import ProtocolViolation, wait_for_turn
from azure_iot_emulator.mqtt.link import ConnectInfo
from azure_iot_emulator.mqtt.packets import Publish
from azure_iot_emulator.sas import SasError, verify_sas

log = logging.getLogger(__name__)

CONNACK_ACCEPTED = 0
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5


class LinkLike(Protocol):
    client_id: str

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None: ...

    def publish_acked(self, topic: str, payload: bytes, on_ack: Callable[[], None]) -> None: ...

    def is_subscribed(self, topic: str) -> bool: ...

    def close(self) -> None: ...


def _thumbprints(certificate: x509.Certificate | None) -> tuple[str, str] | None:
    if certificate is None:
        return None
    sha1 = certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - Azure's thumbprint
    sha256 = certificate.fingerprint(hashes.SHA256()).hex().upper()
    return sha1, sha256


class HubEndpoint:
    """The endpoint of hub ``host`` (its ``name`` is the hub host name)."""

    keeps_sessions = True
    forgets_credentials = True  # the certificate and SAS are checked at CONNECT only (a change to the
    # device's credentials in the registry drops its connection: HubService.put_device)

    def __init__(self, host: str, service: HubService) -> None:
        self.name = host
        self.service = service
        self._tasks: set[asyncio.Task[None]] = set()

    # -------------------------------------------------------------------------------------------- connect
    def claims(self, info: ConnectInfo) -> bool:
        parsed = topics.parse_username(info.username)
        return parsed is not None and parsed.host.lower() == self.name.lower()

    async def authenticate(self, info: ConnectInfo) -> int:
        parsed = topics.parse_username(info.username)
        if parsed is None or parsed.module_id is not None or info.client_id != parsed.device_id:
            log.info(
                "hub %s refused %r: username/client id mismatch or module identity", self.name, info.client_id
            )
            return CONNACK_NOT_AUTHORIZED
        if not ids.is_device_id(parsed.device_id):
            log.info("hub %s refused %r: %s", self.name, parsed.device_id, ids.DEVICE_ID_RULE)
            return 2  # identifier rejected
        device = self.service.registry.get_device(self.name, parsed.device_id)
        if device is None:
            log.info("hub %s refused %s: not registered", self.name, parsed.device_id)
            return CONNACK_NOT_AUTHORIZED
        if device.status != "enabled":
            log.info("hub %s refused %s: disabled", self.name, parsed.device_id)
            return CONNACK_NOT_AUTHORIZED
        if device.auth_type == "selfSigned":
            prints = _thumbprints(info.peer_certificate)
            if prints is None or not device.thumbprint_matches(*prints):
                log.info(
                    "hub %s refused %s: certificate thumbprint %s not registered",
                    self.name,
                    parsed.device_id,
                    prints[0] if prints else None,
                )
                return CONNACK_NOT_AUTHORIZED
            return CONNACK_ACCEPTED
        if device.auth_type == "sas":
            return self._check_device_sas(info, device.device_id, device.primary_key, device.secondary_key)
        log.info(
            "hub %s refused %s: authentication type %s unsupported",
            self.name,
            device.device_id,
            device.auth_type,
        )
        return CONNACK_NOT_AUTHORIZED

    def _check_device_sas(self, info: ConnectInfo, device_id: str, *keys: str | None) -> int:
        password = info.password.decode("utf-8", "replace") if info.password else None
        for key in keys:
            if not key:
                continue
            try:
                verify_sas(
                    password, key_b64=key, policy=None, now=datetime.now(UTC),
                    resources=[f"{self.name}/devices/{device_id}"],
                )
            except SasError:
                continue
            return CONNACK_ACCEPTED
        return CONNACK_BAD_CREDENTIALS

    async def on_connected(self, link: LinkLike) -> None:
        self.service.attach(self.name, link.client_id, link)

    async def on_closed(self, link: LinkLike) -> None:
        self.service.detach(self.name, link.client_id, link)

    # ----------------------------------------------------------------------------------------- traffic
    def may_subscribe(self, link: LinkLike, topic_filter: str) -> bool:
        return topics.may_subscribe(link.client_id, topic_filter)

    def on_subscribed(self, link: LinkLike, topic_filters: Sequence[str]) -> None:
        """A granted devicebound subscription: the device's queued cloud-to-device messages go out now."""
        if any(topics.is_c2d_filter(link.client_id, f) for f in topic_filters):
            self.service.subscribed(self.name, link.client_id)

    def submit_publishes(
        self, link: LinkLike, publishes: Sequence[Publish], after: asyncio.Future[Any] | None
    ) -> asyncio.Future[Any]:
        """The core's one publish call.  A batch that is all well-formed telemetry of this device joins
        the next group commit without a coroutine (the future completes after the commit; the commit
        queue keeps the order) unless a task of this connection is still running; anything else is
        handled in order by a task (:meth:`_handle_in_order`) after the previous batch."""
        if not (isinstance(after, asyncio.Task) and not after.done()):
            device_id = link.client_id
            run: list[tuple[topics.PropertyBag, bytes]] = []
            for packet in publishes:
                properties = topics.telemetry_properties(device_id, packet.topic)
                if properties is None or len(packet.payload) > MAX_MESSAGE_BYTES:
                    break
                run.append((properties, packet.payload))
            else:  # all telemetry
                return self.service.submit_many(self.name, device_id, run)
        return asyncio.get_running_loop().create_task(self._handle_in_order(link, publishes, after))

    async def _handle_in_order(
        self, link: LinkLike, publishes: Sequence[Publish], after: asyncio.Future[Any] | None
    ) -> None:
        """Each run of telemetry is stored with one :meth:`HubService.ingest_many` (one group commit for
        all of it); anything else goes through :meth:`on_publish`, in order.  A violation stops there,
        counting the publishes handled before it (the core acknowledges those and closes)."""
        await wait_for_turn(after)
        device_id = link.client_id
        count = len(publishes)
        index = 0
        while index < count:
            run: list[tuple[topics.PropertyBag, bytes]] = []
            while index < count:
                packet = publishes[index]
                properties = topics.telemetry_properties(device_id, packet.topic)
                if properties is None or len(packet.payload) > MAX_MESSAGE_BYTES:
                    break
                run.append((properties, packet.payload))
                index += 1
            if run:
                await self.service.ingest_many(self.name, device_id, run)
            if index < count:
                packet = publishes[index]
                try:
                    await self.on_publish(link, packet.topic, packet.payload)
                except ProtocolViolation as exc:
                    raise ProtocolViolation(str(exc), handled=index) from exc
                index += 1

    async def on_publish(self, link: LinkLike, topic: str, payload: bytes) -> None:
        device_id = link.client_id
        kind = topics.classify_publish(device_id, topic)
        if isinstance(kind, topics.Forbidden):
            log.info("hub %s: closing %s: %s", self.name, device_id, kind.why)
            raise ProtocolViolation(kind.why)
        if isinstance(kind, topics.Telemetry):
            try:
                await self.service.ingest(self.name, device_id, kind.properties, payload)
            except HubError as exc:
                log.info("hub %s: closing %s: %s", self.name, device_id, exc.message)
                raise ProtocolViolation(exc.message) from exc
            return
        if isinstance(kind, topics.TwinGet):
            self._reply(link, self._twin_get(device_id, kind.rid))
        elif isinstance(kind, topics.TwinReportedPatch):
            self._reply(link, await self._reported(device_id, kind.rid, payload))
        elif isinstance(kind, topics.MethodResponse):
            self.service.method_response(self.name, device_id, kind.status, kind.rid, payload)

    def _twin_get(self, device_id: str, rid: str) -> tuple[str, bytes]:
        try:
            document = self.service.device_twin_document(self.name, device_id)
        except HubError as exc:
            return topics.twin_response_topic(exc.status, rid), _error_body(exc)
        return topics.twin_response_topic(200, rid), json.dumps(document).encode("utf-8")

    async def _reported(self, device_id: str, rid: str, payload: bytes) -> tuple[str, bytes]:
        try:
            version = await self.service.patch_reported(self.name, device_id, payload)
        except HubError as exc:
            return topics.twin_response_topic(exc.status, rid), _error_body(exc)
        return topics.twin_response_topic(204, rid, version), b""

    def _reply(self, link: LinkLike, message: tuple[str, bytes]) -> None:
        """Send after the current publish is acknowledged: never await the device inside its own
        publish handling (its PUBACK could only be read after we return)."""
        topic, payload = message

        async def send() -> None:
            try:
                await link.publish(topic, payload, 1)
            except Exception as exc:  # the device went away; it retries after reconnecting
                log.info("hub %s: response to %s not delivered: %s", self.name, link.client_id, exc)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _error_body(exc: HubError) -> bytes:
    return json.dumps({"errorCode": exc.number, "message": exc.message}).encode("utf-8")
