"""The IoT Hub service adapter: the one module that imports azure-iot-hub.

``HubRegistries(hubs, ca_file=None)`` implements ``provkit.cloud.HubTwinPort`` for the configured linked
hubs; it takes and returns the typed ``HubDevice`` / ``TwinDocument`` / ``TwinPatch`` (the SDK's models
and the twin JSON stay here).  ``IoTHubRegistryManager`` is synchronous (requests/msrest), so every call
runs in a worker thread (``asyncio.to_thread``); the event loop never blocks on it.  One manager per hub,
created lazily in the worker thread and reused (the SDK's HTTP session is not shared between hubs).

Each call runs inside ``provkit.cloud_calls.CallObserver.call`` (a span with the hub name, a latency, an
outcome; a 429 is counted as throttling).
HTTP failures map to ``CloudNotFound`` (404), ``CloudEtagMismatch`` (412), ``CloudUnavailable`` (429,
5xx, connection errors), ``CloudRejected`` (other 4xx).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import Twin, TwinProperties
from msrest.exceptions import ClientRequestError, HttpOperationError

from provkit.cloud import (
    CloudError,
    CloudEtagMismatch,
    CloudNotFound,
    CloudRejected,
    CloudUnavailable,
    HubConfig,
    HubDevice,
    HubDeviceStatus,
    TwinDocument,
    TwinPatch,
)
from provkit.cloud_calls import CallObserver

T = TypeVar("T")


def _status(exc: HttpOperationError) -> int:
    response = getattr(exc, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def translate(exc: Exception, what: str) -> CloudError:
    if isinstance(exc, HttpOperationError):
        status = _status(exc)
        message = f"{what}: IoT Hub answered {status}"
        if status == 404:
            return CloudNotFound(message, status=status)
        if status == 412:
            return CloudEtagMismatch(message, status=status)
        if status == 429 or status >= 500:
            return CloudUnavailable(message, status=status)
        return CloudRejected(message, status=status)
    return CloudUnavailable(f"{what}: IoT Hub unreachable ({type(exc).__name__})")


def _strip_meta(section: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (section or {}).items() if not k.startswith("$")}


class HubRegistries:
    def __init__(
        self, hubs: Sequence[HubConfig], ca_file: Path | None = None, observer: CallObserver | None = None
    ) -> None:
        self._observer = observer or CallObserver("hub")
        self._hubs = {h.host_name.lower(): h for h in hubs}
        self._ca_file = ca_file
        self._managers: dict[str, IoTHubRegistryManager] = {}
        self._lock = threading.Lock()

    def _manager(self, hub: str) -> IoTHubRegistryManager:
        key = hub.lower()
        with self._lock:
            manager = self._managers.get(key)
            if manager is None:
                config = self._hubs.get(key)
                if config is None:
                    raise CloudRejected(f"IoT hub {hub!r} is not configured")
                manager = IoTHubRegistryManager.from_connection_string(config.connection_string.reveal())
                if self._ca_file is not None:
                    manager.protocol.config.connection.verify = str(self._ca_file)
                self._managers[key] = manager
            return manager

    async def _call(self, hub: str, what: str, fn: Callable[[IoTHubRegistryManager], T]) -> T:
        def run() -> T:
            manager = self._manager(hub)
            try:
                return fn(manager)
            except (HttpOperationError, ClientRequestError, OSError) as exc:
                raise translate(exc, what) from exc

        async with self._observer.call(what.replace(" ", "_"), **{"devprov.hub": hub.lower()}):
            try:
                return await asyncio.to_thread(run)
            except CloudUnavailable as exc:
                if exc.status == 429:
                    self._observer.throttled()
                raise

    async def get_device(self, hub: str, device_id: str) -> HubDevice | None:
        try:
            device = await self._call(hub, "get device", lambda m: m.get_device(device_id))
        except CloudNotFound:
            return None
        thumbs = getattr(getattr(device, "authentication", None), "x509_thumbprint", None)
        last = device.last_activity_time
        return HubDevice(
            device_id=device.device_id,
            hub=hub,
            status=HubDeviceStatus.DISABLED if device.status == "disabled" else HubDeviceStatus.ENABLED,
            connection_state=str(device.connection_state or "Disconnected"),
            last_activity=last if last is not None and last.tzinfo is not None and last.year > 1 else None,
            etag=device.etag,
            primary_thumbprint=getattr(thumbs, "primary_thumbprint", None),
            secondary_thumbprint=getattr(thumbs, "secondary_thumbprint", None),
        )

    async def get_twin_document(self, hub: str, device_id: str) -> TwinDocument | None:
        try:
            twin = await self._call(hub, "get twin", lambda m: m.get_twin(device_id))
        except CloudNotFound:
            return None
        desired = twin.properties.desired if twin.properties is not None else {}
        return TwinDocument(etag=twin.etag, tags=_strip_meta(twin.tags), desired=_strip_meta(desired))

    async def patch_twin(self, hub: str, device_id: str, patch: TwinPatch, etag: str) -> None:
        body = Twin(tags=dict(patch.tags), properties=TwinProperties(desired=dict(patch.desired)))
        await self._call(hub, "update twin", lambda m: m.update_twin(device_id, body, etag))

    async def set_device_status(self, hub: str, device: HubDevice, status: HubDeviceStatus) -> None:
        await self._call(
            hub,
            "update device",
            lambda m: m.update_device_with_x509(
                device.device_id,
                device.etag or "*",
                device.primary_thumbprint,
                device.secondary_thumbprint,
                status.value,
            ),
        )


__all__ = ["HubRegistries", "translate"]
