"""Assembly of the activation service: DPS + hub adapters, rate limiter, audit log, domain, servicer.

API: ``async ActivationApp.open(settings, clock=...)``, ``.bindings()``, ``async .start()``,
``async .close()``; ``async run_server(settings)`` (serve until SIGINT/SIGTERM).  Before serving, the
activations a crash left unfinished are completed (``ActivationService.complete_open_intents``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from activation_svc.audit import AuditLog
from activation_svc.ratelimit import AttemptLimiter
from activation_svc.service import ActivationService
from activation_svc.servicer import ActivationServicer
from activation_svc.settings import ActivationSettings
from provkit.dps import DpsEnrollments
from provkit.grpc_server import RunningServer, ServiceBinding, serve, start_server
from provkit.iothub import HubRegistries


def now_utc() -> datetime:
    return datetime.now(UTC)


@dataclass
class ActivationApp:
    settings: ActivationSettings
    dps: DpsEnrollments
    audit: AuditLog
    service: ActivationService

    @classmethod
    async def open(
        cls, settings: ActivationSettings, clock: Callable[[], datetime] = now_utc
    ) -> ActivationApp:
        dps = await DpsEnrollments.open(settings.cloud.dps)
        hubs = HubRegistries(settings.cloud.hubs, settings.cloud.dps.ca_file)
        audit = await AuditLog.open(settings.audit_path)
        limiter = AttemptLimiter(
            clock=clock,
            free_failures=settings.max_failures,
            device_ceiling=settings.device_ceiling,
            window=settings.failure_window,
        )
        service = ActivationService(dps, hubs, settings.cloud, limiter, audit, clock)
        return cls(settings, dps, audit, service)

    def bindings(self) -> list[ServiceBinding]:
        return [ActivationServicer(self.service, self.settings.device_ids).binding()]

    async def start(self) -> RunningServer:
        await self.service.complete_open_intents()
        return await start_server(self.settings.server, self.bindings(), refusals=self.audit)

    async def close(self) -> None:
        await self.dps.close()
        await self.audit.close()


async def run_server(settings: ActivationSettings) -> None:
    app = await ActivationApp.open(settings)
    try:
        await app.service.complete_open_intents()
        await serve(settings.server, app.bindings(), refusals=app.audit)
    finally:
        await app.close()
