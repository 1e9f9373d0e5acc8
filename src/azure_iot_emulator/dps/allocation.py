"""Hub allocation: the built-in policies and the custom allocation webhook.

Built-in policies (``builtin_hub``), over the enrollment's hubs (its ``iotHubs``, else its
``iotHubHostName``, else every linked hub):

- ``hashed`` (the default): SHA-256 of the lower-cased registration id modulo the hub count, so a device
  always lands on the same hub and devices spread evenly;
- ``static``: the enrollment's hub (Azure expects exactly one; with several the first one is used);
- ``geoLatency``: the emulator has no geography, so "lowest latency" is the enrollment hub that comes first
  in the emulator's configured hub order (``--hub-host``, first = nearest).

``custom`` (Azure's AllocationRequest/AllocationResponse contract): DPS POSTs the enrollment (without
secrets), the device's runtime context and the hubs it may choose from to the enrollment's
``customAllocationDefinition.webhookUrl`` and assigns the device as the answer says.  Every way the webhook
can fail ends the registration ``failed`` with Azure's error code and writes nothing on any hub:

- answer 401: 400209 (CustomAllocationUnauthorizedAccess);
- ``iotHubHostName`` missing, null or empty: 400208 (CustomAllocationIotHubNotSpecified);
- any other non-2xx answer, no answer within the timeout, a transport or TLS error, a body that is not a
  JSON object (parsed with ``jsonsafe``) or larger than 96 KB, a hub outside the request's ``linkedHubs``,
  an ``initialTwin`` the hub would refuse, a ``payload`` that is not an object: 400207
  (CustomAllocationFailed).

Azure retries a webhook answering 429 or more up to 10 times over several minutes while the device polls;
the emulator calls once, so a test does not wait minutes to see the failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

import jsonsafe
from azure_iot_emulator.dps import model
from azure_iot_emulator.dps.errors import DpsError

log = logging.getLogger(__name__)

CUSTOM_ALLOCATION_FAILED = 400207
IOT_HUB_NOT_SPECIFIED = 400208
UNAUTHORIZED_ACCESS = 400209

DEFAULT_WEBHOOK_TIMEOUT = 10.0
MAX_WEBHOOK_TIMEOUT = 25.0  # the device SDK gives each DPS request 30 s
MAX_RESPONSE_BYTES = 96 * 1024  # Azure DPS's maximum message size: the payload goes back to the device

INDIVIDUAL = "individualEnrollment"
GROUP = "enrollmentGroup"


class AllocationFailed(Exception):
    """The custom allocation failed: the registration ends ``failed`` with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Allocation:
    hub: str
    initial_twin: dict[str, Any] | None = None
    """The webhook's initial twin; None: the enrollment's applies."""
    payload: dict[str, Any] | None = None
    """Data for the device (``registrationState.payload``)."""


def hashed_choice(registration_id: str, hubs: Sequence[str]) -> str:
    digest = hashlib.sha256(model.registration_key(registration_id).encode("utf-8")).digest()
    return hubs[int.from_bytes(digest[:8], "big") % len(hubs)]


def builtin_hub(
    policy: str | None, registration_id: str, candidates: Sequence[str], linked: Sequence[str]
) -> str:
    """The hub a built-in policy chooses among ``candidates`` (``linked``: the configured hub order)."""
    if policy == "static" or len(candidates) == 1:
        return candidates[0]
    if policy == "geoLatency":
        order = {hub.lower(): n for n, hub in enumerate(linked)}
        return min(candidates, key=lambda hub: order.get(hub.lower(), len(order)))
    return hashed_choice(registration_id, candidates)


def linked_hubs(enrollment: Mapping[str, Any], linked: Sequence[str], current_hub: str | None) -> list[str]:
    """The request's ``linkedHubs``: the enrollment's hubs, or only the current one when the enrollment
    never moves a device (``reprovisionPolicy.updateHubAssignment`` false), as Azure documents."""
    policy = enrollment.get("reprovisionPolicy") or {}
    if current_hub is not None and not policy.get("updateHubAssignment", True):
        return [current_hub]
    return model.candidate_hubs(enrollment, linked)


def _public_attestation(attestation: Mapping[str, Any]) -> dict[str, Any]:
    """The enrollment's attestation as DPS shows it to the webhook: its type and certificate details, never
    a key or a certificate's text."""
    kind = attestation.get("type")
    out: dict[str, Any] = {"type": kind}
    if kind == "x509":
        x509 = attestation.get("x509") or {}
        for section in ("clientCertificates", "signingCertificates", "caReferences"):
            certs = x509.get(section)
            if not isinstance(certs, dict):
                continue
            if section == "caReferences":
                out.setdefault("x509", {})[section] = dict(certs)
                continue
            out.setdefault("x509", {})[section] = {
                slot: {"info": entry.get("info")} for slot, entry in certs.items() if isinstance(entry, dict)
            }
    return out


def allocation_request(
    *,
    kind: str,
    enrollment: Mapping[str, Any],
    registration_id: str,
    attestation: Mapping[str, Any],
    payload: Any,
    current_hub: str | None,
    current_device_id: str | None,
    hubs: Sequence[str],
) -> dict[str, Any]:
    """Azure's AllocationRequest.  ``kind``: ``individualEnrollment`` or ``enrollmentGroup`` with the
    enrollment's service-API JSON; ``attestation``: the device's side (``{"x509": {"certificateInfo":
    ...}}``, ``{"symmetricKey": {}}``)."""
    entry = {k: v for k, v in enrollment.items() if k != "registrationState"}
    entry["attestation"] = _public_attestation(enrollment.get("attestation") or {})
    context: dict[str, Any] = {"registrationId": registration_id}
    if current_hub is not None:
        context["currentIotHubHostName"] = current_hub
        if current_device_id is not None:
            context["currentDeviceId"] = current_device_id
    context.update(attestation)
    if payload is not None:
        context["payload"] = payload
    return {kind: entry, "deviceRuntimeContext": context, "linkedHubs": list(hubs)}


def _failed(message: str) -> AllocationFailed:
    return AllocationFailed(CUSTOM_ALLOCATION_FAILED, message)


def parse_allocation_response(status: int, body: bytes, hubs: Sequence[str]) -> Allocation:
    """The webhook's answer, checked completely: an :class:`Allocation` or :class:`AllocationFailed`."""
    if status == 401:
        raise AllocationFailed(UNAUTHORIZED_ACCESS, "Custom allocation webhook answered 401 Unauthorized")
    if not 200 <= status < 300:
        raise AllocationFailed(CUSTOM_ALLOCATION_FAILED, f"Custom allocation webhook answered {status}")
    try:
        answer = jsonsafe.loads(body)
    except jsonsafe.JsonRefused as exc:
        raise AllocationFailed(
            CUSTOM_ALLOCATION_FAILED, f"Custom allocation webhook answer refused ({exc.reason}): {exc}"
        ) from exc
    if not isinstance(answer, dict):
        raise _failed("Custom allocation webhook answer is not a JSON object")
    hub = answer.get("iotHubHostName")
    if hub is None or hub == "":
        raise AllocationFailed(IOT_HUB_NOT_SPECIFIED, "Custom allocation webhook did not name an IoT hub")
    if not isinstance(hub, str):
        raise _failed("iotHubHostName in the webhook answer is not a string")
    chosen = next((h for h in hubs if h.lower() == hub.lower()), None)
    if chosen is None:
        raise AllocationFailed(
            CUSTOM_ALLOCATION_FAILED,
            f"Custom allocation webhook chose {hub!r}, not one of the linked hubs ({', '.join(hubs)})",
        )
    payload = answer.get("payload")
    if payload is not None and not isinstance(payload, dict):
        raise AllocationFailed(CUSTOM_ALLOCATION_FAILED, "payload in the webhook answer is not a JSON object")
    return Allocation(chosen, _initial_twin(answer.get("initialTwin")), payload)


def _initial_twin(value: Any) -> dict[str, Any] | None:
    """The webhook's ``initialTwin`` under the rules an enrollment's obeys (the hub's twin rules)."""
    if value is None:
        return None
    try:
        twin = model.initial_twin(value)
        model.check_initial_twin(twin)
    except DpsError as exc:
        raise AllocationFailed(CUSTOM_ALLOCATION_FAILED, f"webhook {exc.message}") from exc
    return twin


def _where(url: str) -> str:
    """The webhook's address for logs and messages: never its query (an Azure Function's key is there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class CustomAllocationWebhook:
    """The HTTP client DPS calls custom allocation webhooks with: one POST, a timeout, no redirects, TLS
    verified against the system's trust store plus ``ca_file``."""

    def __init__(self, *, timeout: float = DEFAULT_WEBHOOK_TIMEOUT, ca_file: Path | None = None) -> None:
        if not 0 < timeout <= MAX_WEBHOOK_TIMEOUT:
            raise ValueError(f"webhook timeout must be above 0 and at most {MAX_WEBHOOK_TIMEOUT} s")
        self.timeout = timeout
        self._ssl = ssl.create_default_context()
        if ca_file is not None:
            self._ssl.load_verify_locations(cafile=str(ca_file))
        self._session: aiohttp.ClientSession | None = None

    async def allocate(
        self, definition: Mapping[str, Any], request: Mapping[str, Any], hubs: Sequence[str]
    ) -> Allocation:
        url = definition["webhookUrl"]
        try:
            status, body = await asyncio.wait_for(self._post(url, request), self.timeout)
        except TimeoutError:
            log.info("custom allocation webhook %s: no answer within %s s", _where(url), self.timeout)
            raise _failed(f"Custom allocation webhook did not answer within {self.timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            log.info("custom allocation webhook %s: %s", _where(url), exc)
            raise AllocationFailed(
                CUSTOM_ALLOCATION_FAILED, f"Custom allocation webhook not reachable: {type(exc).__name__}"
            ) from exc
        try:
            allocation = parse_allocation_response(status, body, hubs)
        except AllocationFailed as exc:
            log.info("custom allocation webhook %s: %s (%s)", _where(url), exc.message, exc.code)
            raise
        log.info("custom allocation webhook %s: hub %s", _where(url), allocation.hub)
        return allocation

    async def _post(self, url: str, request: Mapping[str, Any]) -> tuple[int, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl))
        data = json.dumps(request).encode("utf-8")
        headers = {"Content-Type": "application/json; charset=utf-8", "Accept": "application/json"}
        async with self._session.post(url, data=data, headers=headers, allow_redirects=False) as response:
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise AllocationFailed(
                        CUSTOM_ALLOCATION_FAILED,
                        f"Custom allocation webhook answer larger than {MAX_RESPONSE_BYTES} bytes",
                    )
            return response.status, bytes(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
