"""activation_svc settings: one typed object, resolved once from the environment (ACTIVATION_*) and/or a
TOML file (``--config FILE`` or ACTIVATION_CONFIG).

| key (TOML)                        | environment                               | default                    |
|-----------------------------------|-------------------------------------------|----------------------------|
| data_dir                          | ACTIVATION_DATA_DIR                       | ./activation-data          |
| database_url_file                 | ACTIVATION_DATABASE_URL (or _URL_FILE)    | sqlite:///<data_dir>       |
| log_level                         | ACTIVATION_LOG_LEVEL                      | INFO                       |
| server.host / server.port         | ACTIVATION_SERVER_HOST / _PORT            | 127.0.0.1 / 50052          |
| server.insecure                   | ACTIVATION_SERVER_INSECURE                | false (loopback only)      |
| server.insecure_identity          | ACTIVATION_SERVER_INSECURE_IDENTITY       | - (e.g. urn:devprov:oem:a) |
| server.tls_cert_file / _key_file  | ACTIVATION_SERVER_TLS_CERT_FILE / _KEY_FILE | -                        |
| server.client_ca_file             | ACTIVATION_SERVER_CLIENT_CA_FILE          | - (set: mTLS, required)    |
| server.client_auth                | ACTIVATION_SERVER_CLIENT_AUTH             | require with a client CA   |
| limits.max_failures               | ACTIVATION_LIMITS_MAX_FAILURES            | 5 per caller+id, back-off |
| limits.window_seconds             | ACTIVATION_LIMITS_WINDOW_SECONDS          | 900                        |
| device_ids                        | ACTIVATION_DEVICE_IDS                     | guid (provkit.device_id)   |
| intents.hold_seconds              | ACTIVATION_INTENTS_HOLD_SECONDS           | 60 (replicas, intents.py)  |
| requests.lease_seconds            | ACTIVATION_REQUESTS_LEASE_SECONDS         | 30 (replicas)              |
| refusal_audit.window_seconds      | ACTIVATION_REFUSAL_AUDIT_WINDOW_SECONDS   | 60 (provkit.refusal_audit) |
| refusal_audit.max_kinds           | ACTIVATION_REFUSAL_AUDIT_MAX_KINDS        | 10000                      |
| cloud.*                           | ACTIVATION_CLOUD_*                        | see provkit.cloud          |
| templates.<tenant>                | ACTIVATION_TEMPLATES (tenant=file,...)    | - (twin rules only)        |
| metrics.listen                    | ACTIVATION_METRICS_LISTEN                 | - (off; host:port)         |
| tracing.exporter / otlp_endpoint  | ACTIVATION_TRACING_EXPORTER / _OTLP_ENDPOINT | none (console, otlp)    |
| mode                              | ACTIVATION_MODE                           | individual (or group)      |
| registry.database_url             | ACTIVATION_REGISTRY_DATABASE_URL (_FILE)  | database_url (group mode)  |
| allocation.listen                 | ACTIVATION_ALLOCATION_LISTEN              | - (group mode: required)   |
| allocation.function_key           | ACTIVATION_ALLOCATION_FUNCTION_KEY (_FILE) | - (group mode: required)  |
| allocation.tls_cert_file, _key_file | ACTIVATION_ALLOCATION_TLS_CERT_FILE, _KEY_FILE | the server's |
| allocation.client_ca_file         | ACTIVATION_ALLOCATION_CLIENT_CA_FILE      | - (set: mTLS as well)      |

``database_url``: ``postgresql://user:password@host:port/db`` keeps the audit, intents, request ids and the
failure counters in PostgreSQL, shared by every replica (run ``activation-svc migrate`` first); the default
keeps them in ``<data_dir>/audit.sqlite3`` (one process).  ``requests.lease_seconds``: how long a replica's
reservation of a request id lasts unrenewed (a retry on another replica takes over a dead replica's request
after it; ``provkit.idempotency``).

``templates``: a metadata template (a JSON Schema file) per OEM tenant, read and checked at start-up; a
file that is not a usable template stops the service naming the tenant (``activation_svc.templates``).

``mode``: ``individual`` (each device's record is its DPS individual enrollment) or ``group`` (one DPS
enrollment group; each device's record in the device registry, ``provkit.registry``, at
``registry.database_url``, which factory_svc's ``registry.database_url`` must name too; and the allocation
webhook DPS calls at registration, ``activation_svc.allocation``, on ``allocation.listen`` over TLS with the
function key ``allocation.function_key``).  docs/group-mode.md says how the two fit together.

``cloud.*``: the emulator's connection.json by default (ACTIVATION_CLOUD_EMULATOR_CONNECTION_FILE), or the
DPS / hub connection strings, the CA file and the default hub for real Azure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from activation_svc.intents import HOLD
from activation_svc.templates.schema import Templates, load_templates
from dbstore import DatabaseUrl
from provkit.cloud import CloudSettings, load_cloud_settings
from provkit.device_id import DeviceIdPolicy
from provkit.grpc_server import ServerSettings
from provkit.idempotency import LEASE
from provkit.observe import ObserveSettings, observe_settings, parse_listen
from provkit.refusal_audit import RefusalAuditSettings
from provkit.registry import ProvisioningMode, provisioning_mode, registry_url
from provkit.settings import (
    Secret,
    SettingsError,
    SettingsSource,
    database_url,
    device_id_policy,
    refusal_audit_settings,
    request_lease,
    server_settings,
)

PREFIX = "ACTIVATION"
DEFAULT_PORT = 50052
ERROR_DOMAIN = "activation.devprov"


@dataclass(frozen=True)
class AllocationSettings:
    """The allocation webhook's listener (group mode)."""

    host: str
    port: int
    cert_file: Path
    key_file: Path
    function_key: Secret = field(repr=False)
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class ActivationSettings:
    server: ServerSettings
    data_dir: Path
    cloud: CloudSettings
    max_failures: int = 5
    failure_window: timedelta = timedelta(minutes=15)
    intent_hold: timedelta = HOLD
    request_lease: timedelta = LEASE
    log_level: str = "INFO"
    device_ids: DeviceIdPolicy = DeviceIdPolicy.GUID
    observe: ObserveSettings = field(default_factory=ObserveSettings)  # /metrics, traces: off by default
    database: DatabaseUrl | None = None  # None: the SQLite files in data_dir
    templates: Templates = field(default_factory=Templates)  # per OEM tenant (activation_svc.templates)
    mode: ProvisioningMode = ProvisioningMode.INDIVIDUAL
    registry: DatabaseUrl | None = None  # group mode: the device registry (None: database_url)
    allocation: AllocationSettings | None = None  # group mode: the webhook's listener
    refusal_audit: RefusalAuditSettings = field(default_factory=RefusalAuditSettings)

    @property
    def registry_url(self) -> DatabaseUrl:
        return self.registry or self.database_url

    @property
    def database_url(self) -> DatabaseUrl:
        return self.database or DatabaseUrl.sqlite(self.data_dir)

    @property
    def audit_path(self) -> Path:
        return self.data_dir / "audit.sqlite3"


def load_settings(env: Mapping[str, str] | None = None, config: Path | None = None) -> ActivationSettings:
    source = SettingsSource.located(PREFIX, env, config=config)
    max_failures = source.integer("limits.max_failures", 5)
    if source.text("limits.device_ceiling") is not None:
        raise SettingsError(
            f"{source.env_name('limits.device_ceiling')} (limits.device_ceiling) is no longer a setting: a "
            "ceiling of failed codes per device over all callers let anyone lock the owner out; remove it "
            "(docs/parties.md, 'Wrong activation codes', says what limits guessing now)"
        )
    window = source.number("limits.window_seconds", 900.0)
    hold = source.number("intents.hold_seconds", HOLD.total_seconds())
    if hold <= 0:
        raise SettingsError("ACTIVATION_INTENTS_HOLD_SECONDS must be positive")
    if max_failures < 1 or window <= 0:
        raise SettingsError("ACTIVATION_LIMITS_MAX_FAILURES and _WINDOW_SECONDS must be positive")
    data_dir = source.path("data_dir", Path("activation-data")) or Path("activation-data")
    server = server_settings(source, error_domain=ERROR_DOMAIN, default_port=DEFAULT_PORT)
    mode = provisioning_mode(source)
    return ActivationSettings(
        server=server,
        mode=mode,
        registry=registry_url(source, None),
        allocation=allocation_settings(source, server) if mode is ProvisioningMode.GROUP else None,
        data_dir=data_dir,
        database=database_url(source, data_dir),
        cloud=load_cloud_settings(source),
        max_failures=max_failures,
        failure_window=timedelta(seconds=window),
        intent_hold=timedelta(seconds=hold),
        request_lease=request_lease(source),
        log_level=(source.text("log_level", "INFO") or "INFO").upper(),
        device_ids=device_id_policy(source),
        observe=observe_settings(source),
        templates=load_templates(source),
        refusal_audit=refusal_audit_settings(source),
    )


def allocation_settings(source: SettingsSource, server: ServerSettings) -> AllocationSettings:
    """The webhook's listener: required in group mode (DPS has nobody else to ask)."""
    listen_text = (source.text("allocation.listen", "") or "").strip()
    if not listen_text:
        raise SettingsError(
            f"group mode needs the allocation webhook: set {source.env_name('allocation.listen')} (host:port)"
        )
    try:
        host, port = parse_listen(listen_text)
    except SettingsError:
        raise SettingsError(
            f"{source.env_name('allocation.listen')} is host:port, got {listen_text!r}"
        ) from None
    key = source.secret("allocation.function_key")
    if key is None or len(key.reveal().strip()) < 16:
        raise SettingsError(
            "the allocation webhook needs a function key of at least 16 characters: set "
            f"{source.env_name('allocation.function_key')} (or _FILE); DPS sends it in the webhook URL "
            "(?code=)"
        )
    cert, key_file = source.path("allocation.tls_cert_file"), source.path("allocation.tls_key_file")
    if (cert is None) != (key_file is None):
        raise SettingsError(
            f"{source.env_name('allocation.tls_cert_file')} and {source.env_name('allocation.tls_key_file')} "
            "go together"
        )
    if cert is None and server.tls is not None:
        cert, key_file = server.tls.cert_file, server.tls.key_file
    if cert is None or key_file is None:
        raise SettingsError(
            "the allocation webhook is served over TLS only: set "
            f"{source.env_name('allocation.tls_cert_file')} and _KEY_FILE (or the gRPC server's)"
        )
    return AllocationSettings(
        host, port, cert, key_file, Secret(key.reveal().strip()), source.path("allocation.client_ca_file")
    )
