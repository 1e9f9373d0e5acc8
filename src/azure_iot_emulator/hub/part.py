"""Everything the emulator's wiring needs from the IoT Hub half, in one object.

hub = HubPart(db, hub_hosts, clock, service_keys=lambda host: {"iothubowner": keys[host]})
hub.registry                 # HubRegistry (DPS calls provision_from_dps on it)
hub.endpoints                # one MQTT endpoint per hub host (register with the MQTT core)
hub.rest_app(host)           # the aiohttp service REST app of one hub (served on 443 of its host)
await hub.close()            # at shutdown
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from aiohttp import web

from azure_iot_emulator.hub.c2d import C2dLimits
from azure_iot_emulator.hub.endpoint import HubEndpoint
from azure_iot_emulator.hub.registry import HubRegistry
from azure_iot_emulator.hub.rest import build_hub_rest_app
from azure_iot_emulator.hub.service import HubService
from azure_iot_emulator.hub.telemetry import TelemetryMetrics, TelemetryStore
from azure_iot_emulator.quotas import TokenBuckets
from azure_iot_emulator.store import Database


class HubPart:
    def __init__(
        self,
        db: Database,
        hub_hosts: Sequence[str],
        clock: Callable[[], datetime],
        service_keys: Callable[[str], dict[str, str]],
        *,
        registry: HubRegistry | None = None,
        d2c_quota: TokenBuckets | None = None,
        metrics: TelemetryMetrics | None = None,
        c2d_limits: C2dLimits | None = None,
    ) -> None:
        self.registry = registry or HubRegistry(db, hub_hosts, clock)
        self.registry.reset_connection_states()  # nobody is connected to a process that just started
        self.telemetry = TelemetryStore(
            db, clock, on_insert=self.registry.record_activity, metrics=metrics
        )
        self.service = HubService(self.registry, self.telemetry, clock, d2c_quota, c2d_limits=c2d_limits)
        self._clock = clock
        self._keys = service_keys
        self.endpoints = [HubEndpoint(host, self.service) for host in hub_hosts]

    def rest_app(self, host: str, names: Sequence[str] = ()) -> web.Application:
        """``names``: other names of the hub (its address) a SAS token's ``sr`` may use."""
        return build_hub_rest_app(self.service, host, lambda: self._keys(host), self._clock, names)

    async def close(self) -> None:
        await self.service.close()
