"""Assembly of the factory service: CA + ledger + each feature's service + the one gRPC servicer.

``FactoryServicer`` is the single FactoryService implementation registered with the server, composed of
the features' gRPC adapters (``mint.grpc.MintRpcs``, ``revocation.grpc.RevocationRpcs``,
``lots.grpc.LotRpcs``, ``enrollment.grpc.EnrollmentRpcs``); each adapter declares what it needs of it.

Data directory layout (``FactorySettings.data_dir``)::

    <data_dir>/             0700 when the service creates it, like every directory below (files with
                            keys or secrets 0600)
      ledger.sqlite3        issued certificates, revocations, lots and request ids (factory_svc.ledger;
                            SQLite, WAL; plus -wal/-shm)
      crl/                  the CRL: issuing-ca.crl (DER), issuing-ca.crl.pem (see factory_svc.revocation.crl)
      enrollments.sqlite3   the enrollment outbox, its request ids, the enrollment audit, the activation
                            codes not yet acknowledged (AES-GCM encrypted) and their events (both
                            files: the default; with database_url = postgresql://... their tables are
                            in that database instead, shared by replicas)
      codes.key             the codes' 32-byte key (0600), created on first start (replicas share it)
      ca/                   the development CA (only when no CA is configured), created on first start
        root-ca.pem         ECDSA P-384 root, 20 years       root-ca.key     (0600)
        issuing-ca.pem      ECDSA P-256 issuing CA, 10 years issuing-ca.key  (0600)

API: ``async FactoryApp.open(settings, clock=now_utc, observe=None)``, ``.bindings()``,
``async .start()`` (the gRPC server, and ``/metrics`` when configured: ``.observe.metrics_url``),
``async .close()``;
``async run_server(settings)`` (serve until SIGINT/SIGTERM).  With ``renewal.listen`` set, ``open`` also
starts the EST renewal listener (``.renewal_http``, ``factory_svc.renewal``) and its intent worker.
``observe`` (``provkit.observe``) defaults to
what ``settings.observe`` asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from factory_svc.ca.issuing import IssuingCA
from factory_svc.ca.settings import open_ca
from factory_svc.enrollment.app import EnrollmentApp
from factory_svc.enrollment.grpc import EnrollmentRpcs
from factory_svc.enrollment.service import EnrollmentService
from factory_svc.ledger import Ledger
from factory_svc.lots.grpc import LotRpcs
from factory_svc.lots.service import LotService
from factory_svc.mint.grpc import MintRpcs
from factory_svc.mint.service import CertificateCatalog, MintingService
from factory_svc.renewal.http import RenewalHttp, device_ca_pem, server_context
from factory_svc.renewal.service import RenewalService
from factory_svc.revocation.crl import CrlHttp, CrlPublisher
from factory_svc.revocation.grpc import RevocationRpcs
from factory_svc.revocation.service import CloudSide, RevocationIntents, RevocationService
from factory_svc.settings import FactorySettings
from provkit.clock import Clock, now_utc
from provkit.device_id import DeviceIdPolicy
from provkit.grpc_server import RunningServer, ServiceBinding, binding, serve_app, start_server
from provkit.idempotency import RequestIds
from provkit.iothub import HubRegistries
from provkit.metrics import NO_METRICS, SuiteMetrics
from provkit.observe import Observability
from provkit.refusal_audit import RefusalAggregator
from provkit.settings import SettingsError


class FactoryServicer(MintRpcs, RevocationRpcs, LotRpcs, EnrollmentRpcs, pb_grpc.FactoryServiceServicer):
    """FactoryService: one thin method per RPC, from the features' adapters; this class only holds the
    services they call."""

    def __init__(
        self,
        minting: MintingService,
        catalog: CertificateCatalog,
        enrollment: EnrollmentService | None = None,
        device_ids: DeviceIdPolicy = DeviceIdPolicy.GUID,
        metrics: SuiteMetrics = NO_METRICS,
        revocation: RevocationService | None = None,
        lots: LotService | None = None,
    ) -> None:
        self._device_ids = device_ids  # checked at the boundary, by every adapter
        if lots is not None:
            self._lots = lots  # MintCertificates (LotRpcs)
        self._minting = minting
        self._catalog = catalog
        self._revocation = revocation
        self._enrollment = enrollment  # Enroll / EnrollBatch / GetEnrollmentStatus (EnrollmentRpcs)
        self._metrics = metrics

    def binding(self) -> ServiceBinding:
        return binding(
            self,
            pb_grpc.add_FactoryServiceServicer_to_server,
            pb.DESCRIPTOR.services_by_name["FactoryService"],
        )


@dataclass
class FactoryApp:
    settings: FactorySettings
    ca: IssuingCA
    ledger: Ledger
    minting: MintingService
    catalog: CertificateCatalog
    crl: CrlPublisher
    revocation: RevocationService
    enrollment: EnrollmentApp | None = None
    crl_http: CrlHttp | None = None
    renewal: RenewalService | None = None
    renewal_http: RenewalHttp | None = None
    observe: Observability = field(default_factory=Observability.off)
    clock: Clock = now_utc
    # the gate's refusals, on their way to the ledger's refusals table: a flood is a first row and a count
    refusal_audit: RefusalAggregator = field(init=False)

    def __post_init__(self) -> None:
        self.refusal_audit = RefusalAggregator(self.ledger.refusals, self.settings.refusal_audit)

    @classmethod
    async def open(
        cls, settings: FactorySettings, clock: Clock = now_utc, observe: Observability | None = None
    ) -> FactoryApp:
        observe = observe or Observability.open(settings.observe, "factory_svc", factory=True)
        ca = open_ca(settings, clock)
        ledger = await Ledger.open(settings.database_url)
        request_ids = RequestIds(ledger.certificates.reservations, lease=settings.request_lease)
        minting = MintingService(ca, ledger.certificates, settings.mint, clock, request_ids)
        crl = CrlPublisher(ca, ledger.revocations, settings.crl_dir, settings.crl, clock)
        await crl.publish()  # a fresh CRL at every start
        crl.start()
        enrollment, cloud = None, None
        intents = RevocationIntents(ledger.revocations, clock)
        if settings.enroll is not None:
            hubs = HubRegistries(settings.enroll.cloud.hubs, settings.enroll.cloud.dps.ca_file)
            enrollment = await EnrollmentApp.open(
                settings.enroll,
                ca.chain,
                settings.data_dir,
                settings.database_url,
                clock,
                request_lease=settings.request_lease,
                observer=observe.cloud_calls("dps"),
                revocations=intents,
                hubs=hubs,
            )
            cloud = CloudSide(enrollment.dps, hubs)
        revocation = RevocationService(ledger.certificates, ledger.revocations, crl, cloud, clock, intents)
        revocation.start()  # open revocation intents (a crash, an unreachable cloud) are carried out now
        catalog = CertificateCatalog(ledger.certificates)
        app = cls(
            settings, ca, ledger, minting, catalog, crl, revocation, enrollment, observe=observe, clock=clock
        )
        if settings.crl.http_port is not None:
            app.crl_http = CrlHttp(crl, settings.crl.http_host, settings.crl.http_port)
            await app.crl_http.start()
        if settings.renewal.listen is not None:
            await app._start_renewal()
        return app

    async def _start_renewal(self) -> None:
        """The EST listener and the worker that completes open renewals (``factory_svc.renewal``)."""
        renewal = self.settings.renewal
        assert renewal.listen is not None and renewal.tls_cert_file and renewal.tls_key_file
        if self.enrollment is None:
            raise SettingsError("FACTORY_RENEWAL_LISTEN needs DPS: renewal changes the device's enrollment")
        self.renewal = RenewalService(
            self.minting.issuer,
            self.ledger.renewals,
            self.enrollment.dps,
            renewal.policy,
            self.clock,
            self.settings.device_ids,
            self.observe.metrics,
        )
        self.renewal.start()  # open renewals (a crash, DPS unreachable) are carried out now
        context = server_context(renewal.tls_cert_file, renewal.tls_key_file, device_ca_pem(self.renewal))
        host, port = renewal.listen
        self.renewal_http = RenewalHttp(self.renewal, host, port, context, self.observe.metrics)
        await self.renewal_http.start()

    def bindings(self) -> list[ServiceBinding]:
        service = self.enrollment.service if self.enrollment is not None else None
        servicer = FactoryServicer(
            self.minting,
            self.catalog,
            service,
            self.settings.device_ids,
            self.observe.metrics,
            revocation=self.revocation,
            lots=LotService(self.minting, self.ledger.lots, self.clock, self.settings.device_ids),
        )
        return [servicer.binding()]

    async def _outbox_gauges(self) -> None:
        if self.enrollment is None:
            return
        outbox = self.enrollment.outbox
        depth = await outbox.pending_count()
        oldest = await outbox.oldest_pending() if depth else None
        age = (self.clock() - oldest.queued_at).total_seconds() if oldest is not None else 0.0
        self.observe.metrics.outbox(depth, age)

    async def _expiry_gauges(self) -> None:
        self.observe.metrics.certificate_expiry(await self.ledger.renewals.expiry_buckets(self.clock()))

    async def start(self) -> RunningServer:
        """``/metrics`` (when configured: ``.observe.metrics_url``), then the gRPC server."""
        await self.observe.start_endpoint(refresh=[self._outbox_gauges, self._expiry_gauges])
        return await start_server(
            self.settings.server,
            self.bindings(),
            refusals=self.refusal_audit,
            metrics=self.observe.metrics,
            interceptors=self.observe.server_interceptors(),
        )

    async def close(self) -> None:
        if self.renewal_http is not None:
            await self.renewal_http.stop()
        if self.renewal is not None:
            await self.renewal.stop()
        if self.crl_http is not None:
            await self.crl_http.stop()
        await self.crl.stop()
        await self.revocation.stop()
        if self.enrollment is not None:
            await self.enrollment.close()
        await self.refusal_audit.close()  # the open windows' counts, before the ledger closes
        await self.ledger.close()
        await self.observe.shutdown()
        self.ca.close()


async def run_server(settings: FactorySettings) -> None:
    await serve_app(await FactoryApp.open(settings))
