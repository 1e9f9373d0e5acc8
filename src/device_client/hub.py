"""One connection to the assigned hub through azure-iot-device's IoTHubDeviceClient (aio), X.509.

A :class:`HubSession` is one client instance for one connection: the runtime creates a fresh session after
every loss instead of relying on the SDK's own reconnect, so it alone decides about backoff, stale
assignments and the order of buffered messages.  Every SDK call runs under a deadline because some SDK
failure paths never complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.iot.device import X509, exceptions
from azure.iot.device.aio import IoTHubDeviceClient

from device_client.telemetry import to_sdk_message

log = logging.getLogger(__name__)


class HubRefused(Exception):
    """The hub refused the device's credentials (deleted, disabled, moved, or a new certificate)."""


class HubUnavailable(Exception):
    """The hub could not be reached or the connection broke; worth retrying the same hub."""


@dataclass(frozen=True)
class HubTarget:
    hostname: str
    device_id: str
    trusted_ca_pem: str | None


class HubSession:
    def __init__(
        self,
        target: HubTarget,
        *,
        chain_path: Path,
        key_path: Path,
        timeout_s: float,
        on_desired_patch: Callable[[dict[str, Any]], None],
        on_disconnected: Callable[[], None],
    ) -> None:
        self.target = target
        self._timeout_s = timeout_s
        self._on_desired_patch = on_desired_patch
        self._on_disconnected = on_disconnected
        self._loop = asyncio.get_running_loop()
        self._client = IoTHubDeviceClient.create_from_x509_certificate(
            x509=X509(cert_file=str(chain_path), key_file=str(key_path)),
            hostname=target.hostname,
            device_id=target.device_id,
            # We reconnect ourselves (fresh session), so the SDK must neither retry nor auto-connect:
            # a send on a dead link then fails at once instead of queueing behind a reconnect.
            connection_retry=False,
            auto_connect=False,
            **({"server_verification_cert": target.trusted_ca_pem} if target.trusted_ca_pem else {}),
        )
        self._closed = False

    @property
    def connected(self) -> bool:
        return not self._closed and bool(self._client.connected)

    async def _call(self, what: str, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self._timeout_s)
        except exceptions.CredentialError as exc:
            raise HubRefused(f"{self.target.hostname} refused device {self.target.device_id}") from exc
        except TimeoutError as exc:
            raise HubUnavailable(
                f"{what}: no answer from {self.target.hostname} in {self._timeout_s:g} s"
            ) from exc
        except (
            exceptions.ClientError,
            exceptions.OperationTimeout,
            exceptions.NoConnectionError,
            exceptions.ConnectionFailedError,
            exceptions.ConnectionDroppedError,
            OSError,
        ) as exc:
            raise HubUnavailable(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    async def open(self) -> dict[str, Any]:
        """Connect, subscribe to desired-property patches, and return the twin's desired document."""
        await self._call("connect", self._client.connect())
        # The SDK annotates this handler as taking one argument (None) but calls it with none.
        self._client.on_connection_state_change = self._connection_changed  # type: ignore[assignment]
        # The setter subscribes synchronously (it blocks until SUBACK): keep it off the event loop.
        await self._call(
            "subscribe to desired properties",
            asyncio.to_thread(
                setattr, self._client, "on_twin_desired_properties_patch_received", self._patch
            ),
        )
        twin = await self._call("get twin", self._client.get_twin())
        desired = twin.get("desired", {}) if isinstance(twin, dict) else {}
        return desired if isinstance(desired, dict) else {}

    # SDK handler threads hand events to the event loop; events of a closed session are dropped there, so
    # a late "disconnected" from an old client can never tear down its successor.
    def _connection_changed(self) -> None:
        if not self._client.connected:
            self._loop.call_soon_threadsafe(self._deliver, self._on_disconnected)

    def _patch(self, patch: dict[str, Any]) -> None:
        if isinstance(patch, dict):
            self._loop.call_soon_threadsafe(self._deliver, self._on_desired_patch, patch)

    def _deliver(self, callback: Callable[..., None], *args: Any) -> None:
        if not self._closed:
            callback(*args)

    async def send(self, seq: int, message_id: str, body: bytes) -> None:
        await self._call(
            f"send telemetry {seq}", self._client.send_message(to_sdk_message(seq, message_id, body))
        )

    async def report(self, patch: dict[str, Any]) -> None:
        if patch:
            await self._call("report properties", self._client.patch_twin_reported_properties(patch))

    async def close(self) -> None:
        """Disconnect and release the client's threads; never raises, never hangs past the deadline."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.shutdown(), min(self._timeout_s, 10.0))
