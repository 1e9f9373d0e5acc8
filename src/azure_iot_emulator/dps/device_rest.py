"""The DPS device API over HTTPS (api-version 2021-06-01), which the C, Java, .NET and Node SDKs and bare
firmware use instead of MQTT; served on port 443 of the DPS host (``azure_iot_emulator/https.py``):

    PUT /{idScope}/registrations/{registrationId}/register?api-version=...      {"registrationId": ...}
    GET /{idScope}/registrations/{registrationId}/operations/{operationId}?api-version=...

The client certificate (and chain) of the TLS handshake is the device's X.509 credential; without one,
the ``Authorization`` header carries its SAS token (symmetric-key attestation).  Answers are the
same as over MQTT (``dps/operations.py``): ``202 assigning`` with ``Retry-After`` until done, then ``200``
with the registration state; errors carry Azure's error body.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from aiohttp import web

from azure_iot_emulator.dps import model
from azure_iot_emulator.dps.attestation import DeviceCredentials
from azure_iot_emulator.dps.errors import DpsError, bad_request, unauthorized
from azure_iot_emulator.dps.operations import MAX_REQUEST_BYTES, Answer, Assignments, parse_register_body
from azure_iot_emulator.https import peer_certificate, peer_chain

log = logging.getLogger(__name__)


class DpsDeviceApi:
    def __init__(self, id_scope: str, assignments: Assignments, clock: Callable[[], datetime]) -> None:
        self._id_scope = id_scope
        self._assignments = assignments
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [
            web.put("/{scope}/registrations/{id}/register", self._guarded(self.register)),
            web.get("/{scope}/registrations/{id}/operations/{op}", self._guarded(self.poll)),
        ]

    def _guarded(
        self, handler: Callable[[web.Request, str], Awaitable[Answer]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                reg_id = self._check(request)
                answer = await handler(request, reg_id)
            except DpsError as exc:
                log.info("DPS device API %s %s: %s %s", request.method, request.path, exc.status, exc.message)
                headers = {"x-ms-error-code": str(exc.code)}
                if exc.retry_after is not None:
                    headers["Retry-After"] = str(exc.retry_after)
                return web.json_response(exc.body(self._clock()), status=exc.status, headers=headers)
            headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after is not None else {}
            return web.json_response(answer.body, status=answer.status, headers=headers)

        return run

    def _check(self, request: web.Request) -> str:
        if not request.query.get("api-version"):
            raise bad_request("the api-version query parameter is required")
        if request.match_info["scope"] != self._id_scope:
            raise unauthorized("Unauthorized: unknown ID scope")
        reg_id = model.check_registration_id(request.match_info["id"])
        if peer_certificate(request) is None and not request.headers.get("Authorization"):
            raise unauthorized("Unauthorized: neither a client certificate nor a SAS token")
        return reg_id

    async def register(self, request: web.Request, reg_id: str) -> Answer:
        if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
            raise DpsError(413, 413001, "registration request too large")
        body = parse_register_body(await request.read(), reg_id)
        leaf = peer_certificate(request)
        if leaf is not None:
            presented = DeviceCredentials(leaf=leaf, chain=peer_chain(request))
        else:
            presented = DeviceCredentials(sas=request.headers.get("Authorization"))
        answer = await self._assignments.register(reg_id, presented, body.get("payload"))
        log.info("DPS device API register %s: %s %s", reg_id, answer.status, answer.body["status"])
        return answer

    async def poll(self, request: web.Request, reg_id: str) -> Answer:
        return self._assignments.poll(reg_id, request.match_info["op"])
