"""The portal's settings: one typed object, resolved once from the environment (ACTIVATION_PORTAL_*) and/or
the activation TOML file (``--config FILE``, ACTIVATION_PORTAL_CONFIG or ACTIVATION_CONFIG; section
``[portal]``), under the command line's options (``activation_svc.portal.cli``).  The linked hubs offered
in the form come from the SAME cloud settings the activation service reads (``[cloud]`` /
ACTIVATION_CLOUD_*, see ``provkit.cloud``): the proto has no RPC listing them.  Only the
host names are kept; the connection strings are dropped at once.  Likewise the service's database URL
(``database_url`` / ACTIVATION_DATABASE_URL): when it is PostgreSQL, the per-address limit of wrong codes is
kept there, so every portal replica counts the same failures; otherwise each portal process counts its own.

| key (TOML ``[portal]``)       | environment                              | default                         |
|-------------------------------|------------------------------------------|---------------------------------|
| host / port                   | ACTIVATION_PORTAL_HOST / _PORT           | 127.0.0.1 / 8080 (0 = any free) |
| allow_non_loopback            | ACTIVATION_PORTAL_ALLOW_NON_LOOPBACK     | false: refuse other addresses   |
| tls_cert_file / tls_key_file  | ACTIVATION_PORTAL_TLS_CERT_FILE / _KEY_FILE | - (set: HTTPS)               |
| target                        | ACTIVATION_PORTAL_TARGET                 | 127.0.0.1:50052                 |
| insecure                      | ACTIVATION_PORTAL_INSECURE               | false (plaintext, loopback only)|
| ca_file / cert_file / key_file| ACTIVATION_PORTAL_CA_FILE / ...          | - (mTLS client certificate)     |
| server_name                   | ACTIVATION_PORTAL_SERVER_NAME            | -                               |
| timeout_seconds               | ACTIVATION_PORTAL_TIMEOUT_SECONDS        | 30                              |
| max_body_bytes                | ACTIVATION_PORTAL_MAX_BODY_BYTES         | 131072                          |
| max_failures_per_address      | ACTIVATION_PORTAL_MAX_FAILURES_PER_ADDRESS | 5 wrong codes, then back-off  |
| database_url (the service's)  | ACTIVATION_DATABASE_URL (or _URL_FILE)   | - (limits in this process)      |
| device_ids (the service's)    | ACTIVATION_DEVICE_IDS                    | guid (the /batch rows' ids)     |
| allowed_hosts                 | ACTIVATION_PORTAL_ALLOWED_HOSTS          | loopback bind: loopback names   |
| log_level                     | ACTIVATION_PORTAL_LOG_LEVEL              | INFO                            |
| metrics.listen                | ACTIVATION_PORTAL_METRICS_LISTEN         | - (off; host:port: /metrics)    |
| tracing.exporter              | ACTIVATION_PORTAL_TRACING_EXPORTER       | none (console, otlp)            |
| tracing.otlp_endpoint         | ACTIVATION_PORTAL_TRACING_OTLP_ENDPOINT  | -                               |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbstore import DatabaseUrl
from provkit.channels import ChannelSecurity, channel_security
from provkit.cloud import CloudNotConfigured, load_cloud_settings
from provkit.device_id import DeviceIdPolicy
from provkit.errors import InputError
from provkit.grpc_server import is_loopback_host
from provkit.observe import ObserveSettings, observe_settings
from provkit.settings import SettingsError, SettingsSource, database_url_set, device_id_policy

PREFIX = "ACTIVATION"
DEFAULT_PORT = 8080
DEFAULT_TARGET = "127.0.0.1:50052"
DEFAULT_MAX_BODY = 128 * 1024


@dataclass(frozen=True)
class HubChoice:
    """The linked hubs as the activation service's cloud settings name them (empty: not known here)."""

    names: tuple[str, ...] = ()
    default: str | None = None
    source: str = "not configured"


@dataclass(frozen=True)
class PortalSettings:
    security: ChannelSecurity
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    target: str = DEFAULT_TARGET
    allow_non_loopback: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    hubs: HubChoice = HubChoice()
    timeout_seconds: float = 30.0
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_failures_per_address: int = 5
    allowed_hosts: tuple[str, ...] = ()
    log_level: str = "INFO"
    observe: ObserveSettings = field(default_factory=ObserveSettings)  # /metrics, traces: off by default
    limits_database: DatabaseUrl | None = None  # the service's PostgreSQL database: shared per-address limits
    device_ids: DeviceIdPolicy = DeviceIdPolicy.GUID  # the service's setting: the ids a shipment's rows take

    @property
    def https(self) -> bool:
        return self.tls_cert_file is not None

    def check(self) -> None:
        """Refuse settings that would be unsafe (before anything binds)."""
        if not is_loopback_host(self.host) and not self.allow_non_loopback:
            raise SettingsError(
                f"the portal binds loopback only; refusing {self.host!r} "
                "(set ACTIVATION_PORTAL_ALLOW_NON_LOOPBACK=true or pass --allow-non-loopback)"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise SettingsError("ACTIVATION_PORTAL_TLS_CERT_FILE and ..._TLS_KEY_FILE go together")
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not path.is_file():
                raise SettingsError(f"the portal's TLS file {path} does not exist")
        target_host = self.target.rsplit(":", 1)[0] if ":" in self.target else self.target
        if self.security.insecure and not is_loopback_host(target_host):
            raise SettingsError(
                f"a plaintext channel to the activation service is for loopback only, not {self.target!r}"
            )
        if self.max_body_bytes < 1024:
            raise SettingsError("ACTIVATION_PORTAL_MAX_BODY_BYTES must be at least 1024")
        if self.timeout_seconds <= 0:
            raise SettingsError("ACTIVATION_PORTAL_TIMEOUT_SECONDS must be positive")
        if self.max_failures_per_address < 1:
            raise SettingsError("ACTIVATION_PORTAL_MAX_FAILURES_PER_ADDRESS must be at least 1")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[v6]:PORT`` / ``:PORT`` (loopback) -> (host, port)."""
    head, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise SettingsError(f"--listen takes HOST:PORT, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise SettingsError(f"--listen port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise SettingsError(f"--listen port out of range: {port}")
    return (head.strip("[]") or "127.0.0.1"), port


def load_hub_choice(source: SettingsSource) -> HubChoice:
    try:
        cloud = load_cloud_settings(source)
    except CloudNotConfigured:
        return HubChoice()
    return HubChoice(cloud.hub_names, cloud.default_hub, cloud.source)


def load_portal_settings(
    env: Mapping[str, str] | None = None, config: Path | None = None, flags: Mapping[str, Any] | None = None
) -> PortalSettings:
    """``flags``: the command line's values (``activation_svc.portal.cli.portal_flags()``), over the rest."""
    source = SettingsSource.located(
        PREFIX, env, config=config, config_keys=("portal.config", "config"), flags=flags
    )

    def key(name: str) -> str:
        return f"portal.{name}"

    try:
        security = channel_security(source, "portal")
    except OSError as exc:
        raise SettingsError(f"cannot read the portal's client TLS files: {exc}") from exc
    except InputError as exc:
        raise SettingsError(str(exc)) from exc
    allowed = source.text(key("allowed_hosts"), "") or ""
    return PortalSettings(
        security=security,
        host=source.text(key("host"), "127.0.0.1") or "127.0.0.1",
        port=source.integer(key("port"), DEFAULT_PORT),
        target=source.text(key("target"), DEFAULT_TARGET) or DEFAULT_TARGET,
        allow_non_loopback=source.flag(key("allow_non_loopback"), False),
        tls_cert_file=source.path(key("tls_cert_file")),
        tls_key_file=source.path(key("tls_key_file")),
        hubs=load_hub_choice(source),
        timeout_seconds=source.number(key("timeout_seconds"), 30.0),
        max_body_bytes=source.integer(key("max_body_bytes"), DEFAULT_MAX_BODY),
        max_failures_per_address=source.integer(key("max_failures_per_address"), 5),
        allowed_hosts=tuple(h.strip().lower() for h in allowed.split(",") if h.strip()),
        log_level=(source.text(key("log_level"), "INFO") or "INFO").upper(),
        observe=observe_settings(source, "portal"),
        limits_database=_shared(database_url_set(source)),
        device_ids=device_id_policy(source),
    )


def _shared(url: DatabaseUrl | None) -> DatabaseUrl | None:
    """The service's database when the portal keeps its limits there (PostgreSQL), else None."""
    return url if url is not None and url.shared else None
