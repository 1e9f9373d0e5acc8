"""Assembly of the factory service: CA + ledger + domain services + gRPC servicer.

Data directory layout (``FactorySettings.data_dir``)::

    <data_dir>/
      ledger.sqlite3        issued certificates and request ids (SQLite, WAL; plus -wal/-shm files)
      ca/                   the development CA (only when no CA is configured), created on first start
        root-ca.pem         ECDSA P-384 root, 20 years       root-ca.key     (0600)
        issuing-ca.pem      ECDSA P-256 issuing CA, 10 years issuing-ca.key  (0600)

API: ``async FactoryApp.open(settings, clock=now_utc)``, ``.bindings() -> list[ServiceBinding]``,
``async .close()``; ``async run_server(settings)`` (serve until SIGINT/SIGTERM).
"""

from __future__ import annotations

from dataclasses import dataclass

from factory_svc.ca import Clock, IssuingCA, load_configured_ca, now_utc, open_dev_ca
from factory_svc.enrollment.runtime import EnrollmentRuntime
from factory_svc.ledger import SqliteLedger
from factory_svc.minting import CertificateCatalog, MintingService
from factory_svc.servicer import FactoryServicer
from factory_svc.settings import FactorySettings
from provkit.grpc_server import RunningServer, ServiceBinding, serve, start_server


def open_ca(settings: FactorySettings, clock: Clock) -> IssuingCA:
    ca = settings.ca
    if ca.chain_file is not None and ca.key_file is not None:
        passphrase = ca.key_passphrase.reveal() if ca.key_passphrase else None
        return load_configured_ca(ca.chain_file, ca.key_file, passphrase)
    return open_dev_ca(settings.dev_ca_dir, clock)


@dataclass
class FactoryApp:
    settings: FactorySettings
    ca: IssuingCA
    ledger: SqliteLedger
    minting: MintingService
    catalog: CertificateCatalog
    enrollment: EnrollmentRuntime | None = None

    @classmethod
    async def open(cls, settings: FactorySettings, clock: Clock = now_utc) -> FactoryApp:
        ca = open_ca(settings, clock)
        ledger = await SqliteLedger.open(settings.ledger_path)
        minting = MintingService(ca, ledger, settings.mint, clock)
        enrollment = None
        if settings.enroll is not None:
            enrollment = await EnrollmentRuntime.open(settings.enroll, ca.chain, settings.data_dir, clock)
        return cls(settings, ca, ledger, minting, CertificateCatalog(ledger), enrollment)

    def bindings(self) -> list[ServiceBinding]:
        service = self.enrollment.service if self.enrollment is not None else None
        return [FactoryServicer(self.minting, self.catalog, service, self.settings.device_ids).binding()]

    async def start(self) -> RunningServer:
        return await start_server(self.settings.server, self.bindings(), refusals=self.ledger)

    async def close(self) -> None:
        if self.enrollment is not None:
            await self.enrollment.close()
        await self.ledger.close()


async def run_server(settings: FactorySettings) -> None:
    app = await FactoryApp.open(settings)
    try:
        await serve(settings.server, app.bindings(), refusals=app.ledger)
    finally:
        await app.close()
