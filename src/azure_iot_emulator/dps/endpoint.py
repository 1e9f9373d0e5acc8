"""The DPS device MQTT endpoint (plugged into the MQTT core, see ``mqtt/endpoint.py``).

- CONNECT: username ``{idScope}/registrations/{registrationId}/api-version=...``, client id =
  registration id, ID scope must be ours; a client certificate (X.509) or a password (the SAS token of
  symmetric-key attestation) is required (CONNACK 5 otherwise).  Whether either fits an enrollment is
  decided on the register request (401, ``dps/attestation.py``).
- SUBSCRIBE: only ``$dps/registrations/res/#``.
- register: ``202 assigning`` with an ``operationId`` and ``retry-after`` (Azure's way), or the final
  answer at once in ``immediate`` mode (see ``dps/operations.py``); errors are ``res/{status}`` with
  Azure's body.
- poll (``iotdps-get-operationstatus``): ``202`` with ``retry-after`` until the operation is done, then
  its result; an unknown operation or another device's is 404.
Replies are sent after the request's PUBACK (scheduled tasks).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from azure_iot_emulator import ids
from azure_iot_emulator.dps import topics
from azure_iot_emulator.dps.attestation import DeviceCredentials
from azure_iot_emulator.dps.errors import DpsError
from azure_iot_emulator.dps.operations import Answer, Assignments, parse_register_body
from azure_iot_emulator.dps.service import DpsService
from azure_iot_emulator.mqtt.endpoint import ProtocolViolation, handle_in_order
from azure_iot_emulator.mqtt.link import ConnectInfo, Link
from azure_iot_emulator.mqtt.packets import Publish

log = logging.getLogger(__name__)


class DpsEndpoint:
    name = "dps"
    keeps_sessions = False  # Azure DPS ignores CleanSession: sessions are never kept

    def __init__(
        self, service: DpsService, assignments: Assignments, clock: Callable[[], datetime]
    ) -> None:
        self._service = service
        self._assignments = assignments
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()

    def claims(self, info: ConnectInfo) -> bool:
        return topics.parse_username(info.username) is not None

    async def authenticate(self, info: ConnectInfo) -> int:
        parsed = topics.parse_username(info.username)
        assert parsed is not None
        if not ids.is_registration_id(parsed.registration_id):
            log.info("DPS refused %r: %s", info.client_id, ids.REGISTRATION_ID_RULE)
            return 2  # identifier rejected
        if parsed.id_scope != self._service.id_scope:
            log.info("DPS refused %s: unknown ID scope %s", info.client_id, parsed.id_scope)
            return 5
        if info.client_id != parsed.registration_id:
            log.info("DPS refused %s: client id differs from the username's registration id", info.client_id)
            return 5
        if info.peer_certificate is None and not info.password:
            log.info("DPS refused %s: neither a client certificate nor a SAS token", info.client_id)
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
        try:
            if isinstance(request, topics.Poll):
                answer = self._assignments.poll(link.client_id, request.operation_id)
                log.info("DPS poll %s: %s %s", link.client_id, answer.status, answer.body["status"])
            else:
                body = parse_register_body(payload, link.client_id)
                answer = await self._assignments.register(
                    link.client_id, credentials(link.info), body.get("payload")
                )
                log_answer(link.client_id, answer)
        except DpsError as exc:
            what = type(request).__name__.lower()
            log.info("DPS %s %s: %s %s", what, link.client_id, exc.status, exc.message)
            self._reply_error(link, request.rid, exc)
            return
        self._reply(link, topics.response_topic(answer.status, request.rid, answer.retry_after), answer.body)

    def _reply_error(self, link: Link, rid: str, exc: DpsError) -> None:
        topic = topics.response_topic(exc.status, rid, exc.retry_after)
        self._reply(link, topic, exc.body(self._clock()))

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


def credentials(info: ConnectInfo) -> DeviceCredentials:
    """What the device presented at CONNECT: a certificate chain, or a SAS token as its password."""
    if info.peer_certificate is not None:
        return DeviceCredentials(leaf=info.peer_certificate, chain=tuple(info.peer_chain))
    sas = info.password.decode("utf-8", "replace") if info.password else None
    return DeviceCredentials(sas=sas)


def log_answer(registration_id: str, answer: Answer) -> None:
    state = answer.body.get("registrationState", {})
    log.info(
        "DPS register %s: %s %s hub=%s device=%s", registration_id, answer.status, answer.body["status"],
        state.get("assignedHub"), state.get("deviceId"),
    )
