"""The DPS device MQTT endpoint (plugged into the MQTT core, see ``mqtt/endpoint.py``).

- CONNECT: username ``{idScope}/registrations/{registrationId}/api-version=...``, client id =
  registration id, ID scope must be ours; X.509 only, so a client certificate is required (CONNACK 5
  otherwise).  Whether the certificate fits the enrollment is decided on the register request (401).
- SUBSCRIBE: only ``$dps/registrations/res/#``.
- register: the answer is the final one (``200 assigned`` / ``200 disabled``) straight away, which the
  SDK accepts and which spares it a fixed 2 s wait; errors are ``res/{status}`` with Azure's body.
- poll (``iotdps-get-operationstatus``): the stored result of the operation, else 404.
Replies are sent after the request's PUBACK (scheduled tasks).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from azure_iot_emulator.dps import topics
from azure_iot_emulator.dps.errors import DpsError, bad_request
from azure_iot_emulator.dps.service import DpsService, operation_id
from azure_iot_emulator.mqtt.broker import Link
from azure_iot_emulator.mqtt.endpoint import ConnectInfo, ProtocolViolation, handle_in_order
from azure_iot_emulator.mqtt.packets import Publish

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 96 * 1024
_OPERATIONS_KEPT = 10_000


class DpsEndpoint:
    name = "dps"
    keeps_sessions = False  # Azure DPS ignores CleanSession: sessions are never kept

    def __init__(self, service: DpsService, clock: Callable[[], datetime]) -> None:
        self._service = service
        self._clock = clock
        self._operations: collections.OrderedDict[str, tuple[str, dict[str, Any]]] = (
            collections.OrderedDict()
        )
        self._tasks: set[asyncio.Task[None]] = set()

    def claims(self, info: ConnectInfo) -> bool:
        return topics.parse_username(info.username) is not None

    async def authenticate(self, info: ConnectInfo) -> int:
        parsed = topics.parse_username(info.username)
        assert parsed is not None
        if parsed.id_scope != self._service.id_scope:
            log.info("DPS refused %s: unknown ID scope %s", info.client_id, parsed.id_scope)
            return 5
        if info.client_id != parsed.registration_id:
            log.info("DPS refused %s: client id differs from the username's registration id", info.client_id)
            return 5
        if info.peer_certificate is None:
            log.info("DPS refused %s: no client certificate (X.509 attestation only)", info.client_id)
            return 5
        return 0

    def may_subscribe(self, link: Link, topic_filter: str) -> bool:
        return topic_filter == topics.RESPONSE_FILTER

    def submit_publishes(
        self, link: Link, publishes: Sequence[Publish], after: asyncio.Future[Any] | None
    ) -> asyncio.Future[None]:
        return handle_in_order(
            publishes, after, lambda packet: self.on_publish(link, packet.topic, packet.payload)
        )

    async def on_publish(self, link: Link, topic: str, payload: bytes) -> None:
        request = topics.classify(topic)
        if request is None:
            raise ProtocolViolation(f"publish to {topic!r} is not a DPS request")
        if isinstance(request, topics.Poll):
            stored = self._operations.get(request.operation_id)
            if stored is None or stored[0] != link.client_id.lower():
                self._reply_error(link, request.rid, DpsError(404, 404203, "Operation not found"))
            else:
                self._reply(link, topics.response_topic(200, request.rid), stored[1])
            return
        try:
            outcome_body = self._register(link, payload)
        except DpsError as exc:
            log.info("DPS register %s: %s %s", link.client_id, exc.status, exc.message)
            self._reply_error(link, request.rid, exc)
            return
        self._reply(link, topics.response_topic(200, request.rid), outcome_body)

    def _register(self, link: Link, payload: bytes) -> dict[str, Any]:
        if len(payload) > MAX_REQUEST_BYTES:
            raise DpsError(413, 413001, "registration request too large")
        try:
            body = json.loads(payload.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request("registration request body is not JSON") from exc
        if not isinstance(body, dict):
            raise bad_request("registration request body must be a JSON object")
        reg_id = body.get("registrationId")
        if not isinstance(reg_id, str) or reg_id.lower() != link.client_id.lower():
            raise bad_request("registrationId in the body differs from the connection's")
        op = operation_id()
        outcome = self._service.register_x509(link.client_id, link.info.peer_certificate, op)
        self._operations[op] = (link.client_id.lower(), outcome.body)
        while len(self._operations) > _OPERATIONS_KEPT:
            self._operations.popitem(last=False)
        state = outcome.body.get("registrationState", {})
        log.info(
            "DPS register %s: %s hub=%s device=%s", link.client_id, outcome.body["status"],
            state.get("assignedHub"), state.get("deviceId"),
        )
        return outcome.body

    def _reply_error(self, link: Link, rid: str, exc: DpsError) -> None:
        self._reply(link, topics.response_topic(exc.status, rid), exc.body(self._clock()))

    def _reply(self, link: Link, topic: str, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode("utf-8")

        async def send() -> None:
            try:
                await link.publish(topic, payload, 1)
            except ConnectionError as exc:
                log.info("DPS reply to %s not delivered: %s", link.client_id, exc)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
