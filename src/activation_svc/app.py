"""Assembly of the activation service: DPS + hub adapters, rate limiter, audit log, domain, servicer.

API: ``async ActivationApp.open(settings, clock=..., observe=None)``, ``.bindings()``, ``async .start()``
(the gRPC server, and ``/metrics`` when configured: ``.observe.metrics_url``), ``async .close()``;
``async run_server(settings)`` (serve until SIGINT/SIGTERM).  Before serving, the activations a crash left
unfinished are completed (``ActivationService.complete_open_intents``).  ``observe`` (``provkit.observe``)
defaults to what ``settings.observe`` asks for.

Group mode (``settings.mode``): the records are the device registry's (``provkit.registry``), not DPS's, and
``start`` also opens the allocation webhook (``.allocation_http``, ``activation_svc.allocation``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from activation_svc.allocation.http import AllocationHttp, server_context
from activation_svc.allocation.service import AllocationService
from activation_svc.audit import AuditLog
from activation_svc.grpc import ActivationServicer
from activation_svc.service import ActivationService
from activation_svc.settings import ActivationSettings
from activation_svc.shared_limits import failure_limits
from provkit.clock import Clock, now_utc
from provkit.cloud import EnrollmentPort
from provkit.dps import DpsEnrollments
from provkit.grpc_server import RunningServer, ServiceBinding, serve_app, start_server
from provkit.idempotency import RequestIds
from provkit.iothub import HubRegistries
from provkit.observe import Observability
from provkit.refusal_audit import RefusalAggregator
from provkit.registry import DeviceRegistry, ProvisioningMode


@dataclass
class ActivationApp:
    settings: ActivationSettings
    dps: DpsEnrollments | DeviceRegistry
    audit: AuditLog
    service: ActivationService
    observe: Observability = field(default_factory=Observability.off)
    allocation: AllocationService | None = None
    allocation_http: AllocationHttp | None = None
    # refusals anyone can cause, on their way to the audit log: a flood is a first row and a count
    # (``provkit.refusal_audit``): the gate's, and the webhook's wrong function keys
    refusal_audit: RefusalAggregator = field(init=False)
    allocation_refusals: RefusalAggregator | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.refusal_audit = RefusalAggregator(self.audit, self.settings.refusal_audit)

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
        dps: DpsEnrollments | DeviceRegistry
        if settings.mode is ProvisioningMode.GROUP:
            dps = await DeviceRegistry.open(settings.registry_url, clock=clock)
        else:
            dps = await DpsEnrollments.open(settings.cloud.dps, observer=observe.cloud_calls("dps"))
        records: EnrollmentPort = dps
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
            records, hubs, settings.cloud, limits, audit, clock, request_ids, templates=settings.templates
        )
        allocation = AllocationService(dps, audit, clock) if isinstance(dps, DeviceRegistry) else None
        return cls(settings, dps, audit, service, observe, allocation)

    def bindings(self) -> list[ServiceBinding]:
        return [ActivationServicer(self.service, self.settings.device_ids, self.observe.metrics).binding()]

    async def start(self) -> RunningServer:
        """Finish what a crash left open, then ``/metrics`` (when configured: ``.observe.metrics_url``),
        then the gRPC server."""
        await self.service.complete_open_intents()
        await self.observe.start_endpoint()
        await self.start_allocation()
        return await start_server(
            self.settings.server,
            self.bindings(),
            refusals=self.refusal_audit,
            metrics=self.observe.metrics,
            interceptors=self.observe.server_interceptors(),
        )

    async def start_allocation(self) -> None:
        """Group mode: the allocation webhook's listener (``.allocation_http.url``)."""
        config = self.settings.allocation
        if self.allocation is None or config is None or self.allocation_http is not None:
            return
        context = server_context(config.cert_file, config.key_file, config.client_ca_file)
        self.allocation_refusals = RefusalAggregator(self.allocation, self.settings.refusal_audit)
        self.allocation_http = AllocationHttp(
            self.allocation,
            config.host,
            config.port,
            context,
            config.function_key,
            self.observe.metrics,
            refusals=self.allocation_refusals,
        )
        await self.allocation_http.start()

    async def close(self) -> None:
        if self.allocation_http is not None:
            await self.allocation_http.stop()
        await self.dps.close()
        # the open windows' counts, before the audit log closes
        if self.allocation_refusals is not None:
            await self.allocation_refusals.close()
        await self.refusal_audit.close()
        await self.audit.close()
        await self.observe.shutdown()


async def run_server(settings: ActivationSettings) -> None:
    await serve_app(await ActivationApp.open(settings))
