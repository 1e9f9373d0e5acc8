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
| ca.backend                    | FACTORY_CA_BACKEND                | file (or pkcs11)          |
| ca.chain_file / ca.key_file   | FACTORY_CA_CHAIN_FILE / _KEY_FILE | - (unset: development CA) |
| ca.key_passphrase_file        | FACTORY_CA_KEY_PASSPHRASE or FACTORY_CA_KEY_PASSPHRASE_FILE | - |
| ca.pkcs11_module              | FACTORY_CA_PKCS11_MODULE          | /usr/lib/softhsm/libsofthsm2.so |
| ca.pkcs11_token / _key_label  | FACTORY_CA_PKCS11_TOKEN / _KEY_LABEL | - / devprov-issuing-ca |
| ca.pkcs11_pin_file            | FACTORY_CA_PKCS11_PIN or FACTORY_CA_PKCS11_PIN_FILE | - (pkcs11: required) |
| mint.default_validity_days    | FACTORY_MINT_DEFAULT_VALIDITY_DAYS | 730 (shelf + first renewal) |
| mint.min_validity_minutes     | FACTORY_MINT_MIN_VALIDITY_MINUTES | 60 (the shortest a caller may ask for) |
| device_ids                    | FACTORY_DEVICE_IDS                | guid (see provkit.device_id) |
| requests.lease_seconds        | FACTORY_REQUESTS_LEASE_SECONDS    | 30 (replicas: a request id's lease) |
| crl.dir                       | FACTORY_CRL_DIR                   | <data_dir>/crl            |
| crl.validity_hours / refresh_hours | FACTORY_CRL_VALIDITY_HOURS / _REFRESH_HOURS | 168 / 24     |
| crl.http_host / crl.http_port | FACTORY_CRL_HTTP_HOST / _HTTP_PORT | 127.0.0.1 / - (no HTTP)  |
| crl.url                       | FACTORY_CRL_URL                   | - (no CRL DP in certificates) |
| crl.check_seconds             | FACTORY_CRL_CHECK_SECONDS         | 5 (other replicas' revocations) |
| enroll.*, cloud.*             | FACTORY_ENROLL_*, FACTORY_CLOUD_*  | see factory_svc.enrollment.app |
| renewal.listen                | FACTORY_RENEWAL_LISTEN            | - (off; host:port: the EST listener) |
| renewal.tls_cert_file / tls_key_file | FACTORY_RENEWAL_TLS_CERT_FILE / _TLS_KEY_FILE | the gRPC server's |
| renewal.validity_days         | FACTORY_RENEWAL_VALIDITY_DAYS     | 365 (a renewed certificate) |
| renewal.expired_grace_days    | FACTORY_RENEWAL_EXPIRED_GRACE_DAYS | 0 (off: expired never renews) |
| renewal.max_per_day           | FACTORY_RENEWAL_MAX_PER_DAY       | 3 (renewals per device per 24 h) |
| refusal_audit.window_seconds  | FACTORY_REFUSAL_AUDIT_WINDOW_SECONDS | 60 (provkit.refusal_audit) |
| refusal_audit.max_kinds       | FACTORY_REFUSAL_AUDIT_MAX_KINDS   | 10000                     |
| metrics.listen                | FACTORY_METRICS_LISTEN            | - (off; host:port serves /metrics) |
| tracing.exporter / otlp_endpoint | FACTORY_TRACING_EXPORTER / _OTLP_ENDPOINT | none (console, otlp) |

``database_url``: ``postgresql://user:password@host:port/db`` keeps the ledger, the outbox, request ids and
audits in PostgreSQL, shared by every replica (run ``factory-svc migrate`` first); the default keeps them in
``<data_dir>/ledger.sqlite3`` and ``<data_dir>/enrollments.sqlite3`` (one process).

``mint.default_validity_days``: a factory certificate lives through the device's time on the shelf and in
the OEM's stock (a year or more) and then until its first renewal in the field; 730 days leaves a year of
each.  ``mint.min_validity_minutes`` is the shortest validity a MintCertificate may ask for (an hour); a
demonstration of renewal lowers it (``make demo DEMO_ARGS="--cert-minutes 3"``), with
``enroll.min_remaining_validity_days`` = 0 so that such a certificate may be enrolled.  Renewed
certificates (``renewal.validity_days``) are shorter: the device renews them itself (at two thirds of the
lifetime or 30 days before expiry).  ``renewal.listen`` starts the EST listener
(``factory_svc.renewal.http``); it needs DPS (``enroll.*``, ``cloud.*``) and a TLS server certificate.

``requests.lease_seconds``: with replicas, a request id is reserved in the database while one replica
executes it (``provkit.idempotency``); a retry of it on another replica waits, and takes the request over
only when the holder stopped renewing (died) for this long.

The TOML file is given with ``--config FILE`` or ``FACTORY_CONFIG``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from dbstore import DatabaseUrl
from factory_svc.ca.settings import CaSettings, ca_settings
from factory_svc.enrollment.app import EnrollSettings, load_enroll_settings
from factory_svc.errors import ERROR_DOMAIN
from factory_svc.mint.service import MIN_VALIDITY, MintPolicy
from factory_svc.renewal.model import RenewalPolicy, RenewalSettings
from factory_svc.revocation.crl import CrlSettings
from provkit.device_id import DeviceIdPolicy
from provkit.grpc_server import ServerSettings
from provkit.idempotency import LEASE
from provkit.observe import ObserveSettings, observe_settings, parse_listen
from provkit.refusal_audit import RefusalAuditSettings
from provkit.settings import (
    SettingsError,
    SettingsSource,
    database_url,
    device_id_policy,
    refusal_audit_settings,
    request_lease,
    server_settings,
)

PREFIX = "FACTORY"
DEFAULT_VALIDITY_DAYS = 730  # shelf time plus the first renewal (see above)
MIN_VALIDITY_MINUTES = int(MIN_VALIDITY.total_seconds() // 60)
DEFAULT_PORT = 50051


def crl_settings(source: SettingsSource) -> CrlSettings:
    validity = source.number("crl.validity_hours", 168.0)
    refresh = source.number("crl.refresh_hours", 24.0)
    if not 0 < refresh < validity:
        raise SettingsError("FACTORY_CRL_REFRESH_HOURS must be above 0 and below FACTORY_CRL_VALIDITY_HOURS")
    port = source.text("crl.http_port")
    check = source.number("crl.check_seconds", 5.0)
    if check <= 0:
        raise SettingsError("FACTORY_CRL_CHECK_SECONDS must be above 0")
    url = source.text("crl.url", "") or ""
    if url and urlsplit(url).scheme not in ("http", "https"):  # RFC 5280: relying parties fetch http(s)
        raise SettingsError("FACTORY_CRL_URL must be an http:// (or https://) URL")
    return CrlSettings(
        directory=source.path("crl.dir"),
        validity=timedelta(hours=validity),
        refresh=timedelta(hours=refresh),
        http_host=source.text("crl.http_host", "127.0.0.1") or "127.0.0.1",
        http_port=None if not port else source.integer("crl.http_port", 0),
        check=timedelta(seconds=check),
        url=url,
    )


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
    crl: CrlSettings = field(default_factory=CrlSettings)
    database: DatabaseUrl | None = None  # None: the SQLite files in data_dir
    request_lease: timedelta = LEASE
    renewal: RenewalSettings = field(default_factory=RenewalSettings)
    refusal_audit: RefusalAuditSettings = field(default_factory=RefusalAuditSettings)

    @property
    def database_url(self) -> DatabaseUrl:
        return self.database or DatabaseUrl.sqlite(self.data_dir)

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite3"

    @property
    def dev_ca_dir(self) -> Path:
        return self.data_dir / "ca"

    @property
    def crl_dir(self) -> Path:
        return self.crl.directory or self.data_dir / "crl"


def renewal_settings(source: SettingsSource, server: ServerSettings) -> RenewalSettings:
    validity = source.integer("renewal.validity_days", 365)
    grace = source.integer("renewal.expired_grace_days", 0)
    per_day = source.integer("renewal.max_per_day", 3)
    if validity < 1:
        raise SettingsError("FACTORY_RENEWAL_VALIDITY_DAYS must be at least 1")
    if grace < 0:
        raise SettingsError("FACTORY_RENEWAL_EXPIRED_GRACE_DAYS must not be negative")
    if per_day < 1:
        raise SettingsError("FACTORY_RENEWAL_MAX_PER_DAY must be at least 1")
    policy = RenewalPolicy(timedelta(days=validity), timedelta(days=grace), per_day)
    listen_text = (source.text("renewal.listen", "") or "").strip()
    if not listen_text:
        return RenewalSettings(policy=policy)
    try:
        listen = parse_listen(listen_text)
    except SettingsError:
        raise SettingsError(f"FACTORY_RENEWAL_LISTEN is host:port, got {listen_text!r}") from None
    cert, key = source.path("renewal.tls_cert_file"), source.path("renewal.tls_key_file")
    if (cert is None) != (key is None):
        raise SettingsError("FACTORY_RENEWAL_TLS_CERT_FILE and FACTORY_RENEWAL_TLS_KEY_FILE go together")
    if cert is None and server.tls is not None:
        cert, key = server.tls.cert_file, server.tls.key_file
    if cert is None:
        raise SettingsError(
            "the renewal listener needs a TLS server certificate: set FACTORY_RENEWAL_TLS_CERT_FILE and "
            "FACTORY_RENEWAL_TLS_KEY_FILE (or the gRPC server's)"
        )
    return RenewalSettings(listen, cert, key, policy)


def load_settings(env: Mapping[str, str] | None = None, config: Path | None = None) -> FactorySettings:
    source = SettingsSource.located(PREFIX, env, config=config)
    days = source.integer("mint.default_validity_days", DEFAULT_VALIDITY_DAYS)
    if days < 1:
        raise SettingsError("FACTORY_MINT_DEFAULT_VALIDITY_DAYS must be at least 1")
    min_minutes = source.integer("mint.min_validity_minutes", MIN_VALIDITY_MINUTES)
    if min_minutes < 1:
        raise SettingsError("FACTORY_MINT_MIN_VALIDITY_MINUTES must be at least 1")
    data_dir = source.path("data_dir", Path("factory-data")) or Path("factory-data")
    crl = crl_settings(source)
    server = server_settings(source, error_domain=ERROR_DOMAIN, default_port=DEFAULT_PORT)
    return FactorySettings(
        server=server,
        data_dir=data_dir,
        database=database_url(source, data_dir),
        ca=ca_settings(source),
        mint=MintPolicy(
            default_validity=timedelta(days=days),
            crl_url=crl.url,
            min_validity=timedelta(minutes=min_minutes),
        ),
        log_level=(source.text("log_level", "INFO") or "INFO").upper(),
        enroll=load_enroll_settings(source),
        device_ids=device_id_policy(source),
        request_lease=request_lease(source),
        observe=observe_settings(source),
        crl=crl,
        renewal=renewal_settings(source, server),
        refusal_audit=refusal_audit_settings(source),
    )
