"""factory_svc settings: one typed object, resolved once from the environment (FACTORY_*) and/or a TOML file.

| key (TOML)                    | environment                       | default                   |
|-------------------------------|-----------------------------------|---------------------------|
| data_dir                      | FACTORY_DATA_DIR                  | ./factory-data            |
| database_url_file             | FACTORY_DATABASE_URL (or _URL_FILE) | sqlite:///<data_dir>    |
| log_level                     | FACTORY_LOG_LEVEL                 | INFO                      |
| server.host / server.port     | FACTORY_SERVER_HOST / _PORT       | 127.0.0.1 / 50051         |
| server.insecure               | FACTORY_SERVER_INSECURE           | false (loopback only)     |
| server.allow_insecure_non_loopback | FACTORY_SERVER_ALLOW_INSECURE_NON_LOOPBACK | false     |
| server.insecure_identity      | FACTORY_SERVER_INSECURE_IDENTITY  | - (e.g. urn:devprov:factory:a) |
| server.tls_cert_file / tls_key_file | FACTORY_SERVER_TLS_CERT_FILE / _TLS_KEY_FILE | -      |
| server.client_ca_file         | FACTORY_SERVER_CLIENT_CA_FILE     | - (set: mTLS)             |
| server.client_auth            | FACTORY_SERVER_CLIENT_AUTH        | require with a client CA  |
| server.grace_seconds          | FACTORY_SERVER_GRACE_SECONDS      | 10                        |
| ca.chain_file / ca.key_file   | FACTORY_CA_CHAIN_FILE / _KEY_FILE | - (unset: development CA) |
| ca.key_passphrase_file        | FACTORY_CA_KEY_PASSPHRASE or FACTORY_CA_KEY_PASSPHRASE_FILE | - |
| mint.default_validity_days    | FACTORY_MINT_DEFAULT_VALIDITY_DAYS | 365                      |
| device_ids                    | FACTORY_DEVICE_IDS                | guid (see provkit.device_id) |
| enroll.*, cloud.*             | FACTORY_ENROLL_*, FACTORY_CLOUD_*  | see factory_svc.enrollment.runtime |
| metrics.listen                | FACTORY_METRICS_LISTEN            | - (off; host:port serves /metrics) |
| tracing.exporter / otlp_endpoint | FACTORY_TRACING_EXPORTER / _OTLP_ENDPOINT | none (console, otlp) |

``database_url``: ``postgresql://user:password@host:port/db`` keeps the ledger, the outbox, request ids and
audits in PostgreSQL, shared by every replica (run ``factory-svc migrate`` first); the default keeps them in
``<data_dir>/ledger.sqlite3`` and ``<data_dir>/enrollments.sqlite3`` (one process).

The TOML file is given with ``--config FILE`` or ``FACTORY_CONFIG``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from dbstore import DatabaseUrl
from factory_svc.enrollment.runtime import EnrollSettings, load_enroll_settings
from factory_svc.errors import ERROR_DOMAIN
from factory_svc.minting import MintPolicy
from provkit.device_id import DeviceIdPolicy
from provkit.grpc_server import ServerSettings
from provkit.observe import ObserveSettings, observe_settings
from provkit.settings import (
    Secret,
    SettingsError,
    SettingsSource,
    database_url,
    device_id_policy,
    server_settings,
)

PREFIX = "FACTORY"
DEFAULT_PORT = 50051


@dataclass(frozen=True)
class CaSettings:
    chain_file: Path | None = None  # None: the development CA in <data_dir>/ca
    key_file: Path | None = None
    key_passphrase: Secret | None = None


@dataclass(frozen=True)
class FactorySettings:
    server: ServerSettings
    data_dir: Path
    ca: CaSettings
    mint: MintPolicy
    log_level: str = "INFO"
    enroll: EnrollSettings | None = None  # None: no DPS configured (Enroll answers FAILED_PRECONDITION)
    device_ids: DeviceIdPolicy = DeviceIdPolicy.GUID
    observe: ObserveSettings = field(default_factory=ObserveSettings)  # /metrics, traces: off by default
    database: DatabaseUrl | None = None  # None: the SQLite files in data_dir

    @property
    def database_url(self) -> DatabaseUrl:
        return self.database or DatabaseUrl.sqlite(self.data_dir)

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite3"

    @property
    def dev_ca_dir(self) -> Path:
        return self.data_dir / "ca"


def load_settings(env: Mapping[str, str] | None = None, config: Path | None = None) -> FactorySettings:
    probe = SettingsSource(PREFIX, env=env)
    config = config or probe.path("config")
    source = SettingsSource(PREFIX, env=env, file=config)
    chain, key = source.path("ca.chain_file"), source.path("ca.key_file")
    if (chain is None) != (key is None):
        raise SettingsError("FACTORY_CA_CHAIN_FILE and FACTORY_CA_KEY_FILE go together")
    days = source.integer("mint.default_validity_days", 365)
    if days < 1:
        raise SettingsError("FACTORY_MINT_DEFAULT_VALIDITY_DAYS must be at least 1")
    data_dir = source.path("data_dir", Path("factory-data")) or Path("factory-data")
    return FactorySettings(
        server=server_settings(source, error_domain=ERROR_DOMAIN, default_port=DEFAULT_PORT),
        data_dir=data_dir,
        database=database_url(source, data_dir),
        ca=CaSettings(chain, key, source.secret("ca.key_passphrase")),
        mint=MintPolicy(default_validity=timedelta(days=days)),
        log_level=(source.text("log_level", "INFO") or "INFO").upper(),
        enroll=load_enroll_settings(source),
        device_ids=device_id_policy(source),
        observe=observe_settings(source),
    )
