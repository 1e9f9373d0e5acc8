"""Device registration as an asynchronous operation, as Azure's DPS runs it, shared by the MQTT and the
HTTPS device APIs.

Azure answers a register request ``202 assigning`` with an ``operationId`` and a ``retry-after``; the
device then polls the operation until it is ``assigned`` (or ``disabled``/``failed``), each poll answered
``202`` with a ``retry-after`` while the assignment is still running.  Here the work (attestation, hub
allocation, the hub identity) is done when the request arrives, so every refusal is immediate and nothing
is half done; only the answer is held back until ``delay`` seconds have passed.  ``delay=None`` is the
emulator's ``immediate`` mode: the final answer straight away on the register request (the SDKs accept
it, and it spares them their fixed 2 s wait).

Operations live in memory (bounded); after a restart a device polling an old operation gets 404 and,
like after any DPS failure, registers again.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import jsonsafe
from azure_iot_emulator.dps.attestation import DeviceCredentials
from azure_iot_emulator.dps.errors import DpsError, bad_request, throttled
from azure_iot_emulator.dps.service import DpsService, RegistrationOutcome, operation_id
from azure_iot_emulator.quotas import DpsQuotas

MAX_REQUEST_BYTES = 96 * 1024  # Azure DPS: maximum message size
OPERATIONS_KEPT = 10_000
REGISTER_RETRY_AFTER = 3  # what Azure sends on the register answer (the Python SDK waits 2 s regardless)


@dataclass(frozen=True)
class Answer:
    """One answer to a device: HTTP-like status, JSON body and the optional ``retry-after`` (seconds)."""

    status: int
    body: dict[str, Any]
    retry_after: int | None = None


@dataclass(frozen=True)
class _Operation:
    owner: str  # registration id, lower case (ids are case-insensitive)
    ready_at: float
    final: dict[str, Any]


def parse_register_body(payload: bytes, registration_id: str) -> dict[str, Any]:
    """The register request's body: a JSON object whose ``registrationId`` is the caller's."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise DpsError(413, 413001, "registration request too large")
    try:
        body = jsonsafe.loads(payload)
    except jsonsafe.JsonRefused as exc:
        raise bad_request(f"registration request body refused ({exc.reason}): {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request("registration request body must be a JSON object")
    reg_id = body.get("registrationId")
    if not isinstance(reg_id, str) or reg_id.lower() != registration_id.lower():
        raise bad_request("registrationId in the body differs from the caller's registration id")
    return body


class RegistrationMetrics(Protocol):
    def registration(self, result: str) -> None: ...


class Assignments:
    def __init__(
        self,
        service: DpsService,
        *,
        delay: float | None,
        quotas: DpsQuotas | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: RegistrationMetrics | None = None,
    ) -> None:
        if delay is not None and delay < 0:
            raise ValueError("assignment delay must be >= 0")
        self._service = service
        self.delay = delay
        self._quotas = quotas
        self._now = monotonic
        self._metrics = metrics
        self._operations: collections.OrderedDict[str, _Operation] = collections.OrderedDict()

    async def register(
        self, registration_id: str, credentials: DeviceCredentials, payload: Any = None
    ) -> Answer:
        """A register request (body already checked with :func:`parse_register_body`; ``payload``: its
        ``payload``, for a custom allocation webhook).  Refusals are
        raised as :class:`DpsError` (429 with ``retry_after`` past the registration quota).  Each answer is
        counted by result (assigned, disabled, failed; refused or throttled)."""
        try:
            op, registered = await self._register(registration_id, credentials, payload)
        except DpsError as exc:
            self._count("throttled" if exc.status == 429 else "refused")
            raise
        self._count(str(registered.body.get("status", "unknown")))
        if self.delay is None:
            self._keep(op, _Operation(registration_id.lower(), self._now(), registered.body))
            return Answer(registered.status, registered.body)
        self._keep(op, _Operation(registration_id.lower(), self._now() + self.delay, registered.body))
        return Answer(202, _assigning(op), REGISTER_RETRY_AFTER)

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.registration(result)

    async def _register(
        self, registration_id: str, credentials: DeviceCredentials, payload: Any
    ) -> tuple[str, RegistrationOutcome]:
        if self._quotas is not None and (wait := self._quotas.registrations.take()) is not None:
            raise throttled("device registrations", wait)
        op = operation_id()
        return op, await self._service.register(registration_id, credentials, op, payload)

    def poll(self, registration_id: str, op_id: str) -> Answer:
        """An operation-status request: ``202 assigning`` until the operation is done, then its result.
        Another device's operation is as unknown as a made-up one (404).  Past the polling quota: 429."""
        if self._quotas is not None:
            wait = self._quotas.polls.take(registration_id.lower())
            if wait is not None:
                raise throttled("device polling", wait)
        operation = self._operations.get(op_id)
        if operation is None or operation.owner != registration_id.lower():
            raise DpsError(404, 404203, "Operation not found")
        remaining = operation.ready_at - self._now()
        if remaining > 0:
            return Answer(202, _assigning(op_id), max(1, math.ceil(remaining)))
        return Answer(200, operation.final)

    def _keep(self, op: str, operation: _Operation) -> None:
        self._operations[op] = operation
        while len(self._operations) > OPERATIONS_KEPT:
            self._operations.popitem(last=False)


def _assigning(op: str) -> dict[str, Any]:
    return {"operationId": op, "status": "assigning"}
