"""DPS registration through azure-iot-device's ProvisioningDeviceClient (aio), with X.509.

The SDK reports every refusal of a registration as ``ClientError("Unexpected failure")`` whose cause is
a pipeline ``ServiceError`` carrying the registration status or the HTTP-like status code only in its
text; :func:`classify_registration_error` is the one place that reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from azure.iot.device import X509, exceptions
from azure.iot.device.aio import ProvisioningDeviceClient

from device_client.state import Assignment

log = logging.getLogger(__name__)


class RegistrationOutcome(StrEnum):
    NOT_ACTIVATED = "not_activated"  # enrollment exists but is disabled
    NOT_ENROLLED = "not_enrolled"  # DPS knows no enrollment for this id (yet)
    # DPS could not allocate a hub: in group mode the allocation webhook refused the device (not activated
    # yet, or deactivated or revoked: the device is never told which), so it waits like NOT_ACTIVATED
    NOT_ALLOCATED = "not_allocated"
    CREDENTIALS_REFUSED = "credentials_refused"
    FAILED = "failed"  # DPS answered with a failed registration
    UNREACHABLE = "unreachable"  # transport / TLS / timeout


class RegistrationRefused(Exception):
    """A registration DPS did not complete, with the classified reason.  A plain exception (not a frozen
    dataclass): Python sets ``__traceback__`` / ``__context__`` on it while it propagates."""

    def __init__(self, outcome: RegistrationOutcome, detail: str) -> None:
        super().__init__(f"{outcome.value}: {detail}")
        self.outcome = outcome
        self.detail = detail


# The texts of azure-iot-device 2.14's provisioning ServiceError (pipeline_stages_provisioning.py).
_INVALID_STATUS_RE = re.compile(r"invalid registration status (\w+)", re.IGNORECASE)
_FAILED_STATUS = "failed registration status"
_CODE_RE = re.compile(r"service error status code (\d{3})")


def _cause_texts(exc: BaseException) -> list[str]:
    texts, seen = [], set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        texts.append(str(node))
        node = node.__cause__ or node.__context__
    return texts


def classify_registration_error(exc: BaseException) -> RegistrationRefused:
    if isinstance(exc, RegistrationRefused):
        return exc
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return RegistrationRefused(RegistrationOutcome.UNREACHABLE, "DPS did not answer in time")
    if isinstance(exc, exceptions.CredentialError):
        return RegistrationRefused(
            RegistrationOutcome.CREDENTIALS_REFUSED, "DPS refused the device certificate"
        )
    if isinstance(exc, exceptions.ConnectionFailedError | exceptions.ConnectionDroppedError):
        return RegistrationRefused(RegistrationOutcome.UNREACHABLE, "cannot connect to DPS")
    if isinstance(exc, exceptions.OperationTimeout):
        return RegistrationRefused(RegistrationOutcome.UNREACHABLE, "DPS connection timed out")
    texts = _cause_texts(exc)
    joined = " | ".join(texts)
    for text in texts:
        match = _INVALID_STATUS_RE.search(text)
        if match:
            status = match.group(1).lower()
            if status == "disabled":
                return RegistrationRefused(RegistrationOutcome.NOT_ACTIVATED, "the enrollment is disabled")
            return RegistrationRefused(RegistrationOutcome.FAILED, f"registration status {status}")
        if _FAILED_STATUS in text:
            return RegistrationRefused(
                RegistrationOutcome.NOT_ALLOCATED, "DPS could not allocate a hub (not activated yet?)"
            )
        code = _CODE_RE.search(text)
        if code:
            status_code = int(code.group(1))
            if status_code == 404:
                return RegistrationRefused(
                    RegistrationOutcome.NOT_ENROLLED, "DPS has no enrollment for the device"
                )
            if status_code in (401, 403):
                return RegistrationRefused(
                    RegistrationOutcome.CREDENTIALS_REFUSED, f"DPS answered {status_code}"
                )
            return RegistrationRefused(RegistrationOutcome.FAILED, f"DPS answered {status_code}")
    if "TLS" in joined or "SSL" in joined or "certificate verify" in joined:
        return RegistrationRefused(RegistrationOutcome.UNREACHABLE, "TLS handshake with DPS failed")
    return RegistrationRefused(RegistrationOutcome.UNREACHABLE, texts[-1] if texts else type(exc).__name__)


@dataclass(frozen=True)
class DpsTarget:
    global_endpoint: str
    id_scope: str
    trusted_ca_pem: str | None


async def release(client: ProvisioningDeviceClient, timeout_s: float) -> None:
    """Shut the client's pipeline down: after a refused registration the SDK keeps its MQTT connection
    open and has no public way to close it (2.14), so use the pipeline's shutdown operation."""
    pipeline = getattr(client, "_pipeline", None)
    if pipeline is None:
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def callback(error: BaseException | None = None) -> None:
        loop.call_soon_threadsafe(settle)

    try:
        pipeline.shutdown(callback=callback)
    except Exception:  # already shut down (it does so itself after "assigned")
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done, timeout_s)


def cancel_leftover_timers() -> None:
    """Call once, when the process is done with DPS.  After a registration that polled (Azure answers
    ``202 assigning`` first) and ended refused, the SDK (2.14) leaves operation timers (``threading.Timer``)
    of its shut-down client running; at interpreter exit they fire into its already-closed executors,
    print a traceback and hold the exit up for as long as 30 s.  Their clients are gone: cancel them."""
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer):
            thread.cancel()


async def register(
    *, guid: str, chain_path: Path, key_path: Path, target: DpsTarget, timeout_s: float
) -> Assignment:
    """One registration attempt; raises :class:`RegistrationRefused` with the classified reason."""
    try:
        client = ProvisioningDeviceClient.create_from_x509_certificate(
            provisioning_host=target.global_endpoint,
            registration_id=guid,
            id_scope=target.id_scope,
            x509=X509(cert_file=str(chain_path), key_file=str(key_path)),
            **({"server_verification_cert": target.trusted_ca_pem} if target.trusted_ca_pem else {}),
        )
    except (ValueError, TypeError) as exc:
        raise RegistrationRefused(RegistrationOutcome.FAILED, f"bad registration parameters: {exc}") from exc
    assigned = False
    try:
        result = await asyncio.wait_for(client.register(), timeout_s)
        state = getattr(result, "registration_state", None)
        if result is None or result.status != "assigned" or state is None or not state.assigned_hub:
            status = getattr(result, "status", None)
            raise RegistrationRefused(
                RegistrationOutcome.NOT_ACTIVATED if status == "disabled" else RegistrationOutcome.FAILED,
                f"registration ended with status {status}",
            )
        assigned = True
        return Assignment(
            assigned_hub=state.assigned_hub,
            device_id=state.device_id or guid,
            registered_at=datetime.now(UTC),
            id_scope=target.id_scope,
        )
    except RegistrationRefused:
        raise
    except Exception as exc:
        raise classify_registration_error(exc) from exc
    finally:
        if not assigned:
            await release(client, min(timeout_s, 5.0))
