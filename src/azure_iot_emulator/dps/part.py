"""Everything the emulator's wiring needs from the DPS half, in one object."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from aiohttp import web

from azure_iot_emulator.dps.allocation import CustomAllocationWebhook
from azure_iot_emulator.dps.device_rest import DpsDeviceApi
from azure_iot_emulator.dps.endpoint import DpsEndpoint
from azure_iot_emulator.dps.operations import Assignments, RegistrationMetrics
from azure_iot_emulator.dps.rest import WriteCounter, build_dps_rest_app
from azure_iot_emulator.dps.service import DpsService, HubProvisioner
from azure_iot_emulator.quotas import DpsQuotas
from azure_iot_emulator.store import Database


class DpsPart:
    def __init__(
        self,
        db: Database,
        *,
        id_scope: str,
        hub_hosts: Sequence[str],
        registry: HubProvisioner,
        clock: Callable[[], datetime],
        service_keys: Callable[[], dict[str, str]],
        assignment_delay: float | None,
        names: Sequence[str],
        azure_quotas: bool = False,
        metrics: RegistrationMetrics | None = None,
        webhook: CustomAllocationWebhook | None = None,
        writes: WriteCounter | None = None,
    ) -> None:
        self._writes = writes
        self.service = DpsService(
            db, id_scope=id_scope, hub_hosts=hub_hosts, registry=registry, clock=clock, webhook=webhook
        )
        self.quotas = DpsQuotas() if azure_quotas else None
        self.assignments = Assignments(
            self.service, delay=assignment_delay, quotas=self.quotas, metrics=metrics
        )
        self.endpoint = DpsEndpoint(self.service, self.assignments, clock)
        self.device_api = DpsDeviceApi(id_scope, self.assignments, clock)
        self._keys = service_keys
        self._clock = clock
        self._names = tuple(names)

    def rest_app(self) -> web.Application:
        return build_dps_rest_app(
            self.service, self._keys, self._clock, self._names,
            self.quotas.operations if self.quotas is not None else None,
            self._writes,
        )

    async def close(self) -> None:
        await self.endpoint.close()
        await self.service.webhook.close()
