"""Assembly of the activation service: DPS + hub adapters, rate limiter, audit log, domain, servicer.

API: ``async ActivationApp.open(settings, clock=..., observe=None)``, ``.bindings()``, ``async .start()``
(the gRPC server, and ``/metrics`` when configured: ``.observe.metrics_url``), ``async .close()``;
``async run_server(settings)`` (serve until SIGINT/SIGTERM).  Before serving, the activations a crash left
unfinished are completed (``ActivationService.complete_open_intents``).  ``observe`` (``provkit.observe``)
defaults to what ``settings.observe`` asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from activation_svc.audit import AuditLog
from activation_svc.grpc import ActivationServicer
from activation_svc.service import ActivationService
from activation_svc.settings import ActivationSettings
from activation_svc.shared_limits import failure_limits
from provkit.clock import Clock, now_utc
from provkit.dps import DpsEnrollments
from provkit.grpc_server import RunningServer, ServiceBinding, serve_app, start_server
from provkit.idempotency import RequestIds
from provkit.iothub import HubRegistries
from provkit.observe import Observability


@dataclass
class ActivationApp:
    settings: ActivationSettings
    dps: DpsEnrollments
    audit: AuditLog
    service: ActivationService
    observe: Observability = field(default_factory=Observability.off)

    @classmethod
    async def open(
        cls,
        settings: ActivationSettings,
        clock: Clock = now_utc,
        observe: Observability | None = None,
    ) -> ActivationApp:
        observe = observe or Observability.open(settings.observe, "activation_svc")
        # first: a database at another schema version stops here, before anything outside is opened
        audit = await AuditLog.open(settings.database_url, intent_hold=settings.intent_hold)
        dps = await DpsEnrollments.open(settings.cloud.dps, observer=observe.cloud_calls("dps"))
        hub_calls = observe.cloud_calls("hub")
        hubs = HubRegistries(settings.cloud.hubs, settings.cloud.dps.ca_file, observer=hub_calls)
        limits = failure_limits(
            audit.db,
            clock=clock,
            free_failures=settings.max_failures,
            window=settings.failure_window,
        )
        request_ids = RequestIds(audit.reservations, lease=settings.request_lease)
        service = ActivationService(
            dps, hubs, settings.cloud, limits, audit, clock, request_ids, templates=settings.templates
        )
        return cls(settings, dps, audit, service, observe)

    def bindings(self) -> list[ServiceBinding]:
        return [ActivationServicer(self.service, self.settings.device_ids, self.observe.metrics).binding()]

    async def start(self) -> RunningServer:
        """Finish what a crash left open, then ``/metrics`` (when configured: ``.observe.metrics_url``),
        then the gRPC server."""
        await self.service.complete_open_intents()
        await self.observe.start_endpoint()
        return await start_server(
            self.settings.server,
            self.bindings(),
            refusals=self.audit,
            metrics=self.observe.metrics,
            interceptors=self.observe.server_interceptors(),
        )

    async def close(self) -> None:
        await self.dps.close()
        await self.audit.close()
        await self.observe.shutdown()


async def run_server(settings: ActivationSettings) -> None:
    await serve_app(await ActivationApp.open(settings))
