"""One typed settings object for the device client, resolved once at start-up.

Sources, lowest precedence first: built-in defaults, the config file (``--config`` or
``DEVICE_CLIENT_CONFIG``; TOML, flat keys as below), the device's own ``settings.toml`` in its state
directory (written at provisioning), the environment (``DEVICE_CLIENT_<KEY>`` upper-case), then
command-line flags.  Keys::

    state_root                 directory holding one state directory per device
    id_scope                   DPS ID scope
    global_endpoint            DPS global device endpoint host
    trusted_ca_file            PEM file with the trust anchor for DPS and the hubs (omit: system roots)
    factory_address            host:port of factory_svc
    factory_tls                insecure | tls | mtls
    factory_ca_file            PEM trust anchor for factory_svc (tls, mtls)
    factory_client_cert_file   client certificate chain PEM (mtls)
    factory_client_key_file    client private key PEM (mtls)
    factory_timeout_s          deadline of each factory RPC
    telemetry_interval_s       seconds between telemetry messages (desired property telemetryIntervalSeconds
                               overrides it at run time)
    buffer_max_messages        bound of the persisted outbox; the oldest are dropped beyond it
    backoff_initial_s          first retry delay (DPS registration, hub connection)
    backoff_max_s              retry delay cap (delays: full jitter below the capped exponential)
    first_attempt_window_s     spread the first DPS / hub attempt after boot uniformly over this many seconds
                               (0, the default: at once; a simulated fleet booting together uses a few s)
    sdk_timeout_s              deadline of every single SDK call (some SDK failure paths never return)
    give_up_after_s            stop `run` with an error when DPS/the hub stays unusable this long (0: never)
    crl_check_interval_s       while DPS refuses the device, look at the CRL its certificate names at the
                               first refusal and then at most this often (a verified CRL listing it: revoked)
    log_format                 auto | json | text
    device_ids                 guid (default) | registration-id: which device ids are accepted
                               (see provkit.device_id)

Certificate renewal in the field (EST, RFC 7030; see ``device_client.renewal``), a ``[renewal]`` table in a
file, ``DEVICE_CLIENT_RENEWAL_<KEY>`` in the environment::

    renewal.est_url            https://host:port of the factory's EST listener (empty: renewal off)
    renewal.ca_file            PEM trust anchor for the EST listener's TLS certificate (omit: the
                               factory_ca_file, else the system roots); `provision --est-url` copies
                               the factory CA it used into the state directory and names it here
    renewal.fraction           renew once this fraction of the lifetime has elapsed (0.667) ...
    renewal.days_before        ... or this many days before expiry, whichever comes first (30)
    renewal.check_interval_s   how often a running device looks (86400, jittered +-10 %); it also wakes
                               when the certificate becomes due, so a short-lived one renews in time
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from device_client.errors import DeviceSettingsError, Reason
from mainkit.settings import FlagKeys, SettingsError, SettingsFile, SettingsSource
from provkit.device_id import DeviceIdPolicy

ENV_PREFIX = "DEVICE_CLIENT_"


class FactoryTls(StrEnum):
    INSECURE = "insecure"
    TLS = "tls"
    MTLS = "mtls"


@dataclass(frozen=True)
class FactorySettings:
    address: str
    tls: FactoryTls
    ca_file: Path | None
    client_cert_file: Path | None
    client_key_file: Path | None
    timeout_s: float


@dataclass(frozen=True)
class CloudSettings:
    id_scope: str | None
    global_endpoint: str
    trusted_ca_file: Path | None

    def require_scope(self) -> str:
        if not self.id_scope:
            raise DeviceSettingsError(
                "no DPS ID scope configured (id_scope in settings, DEVICE_CLIENT_ID_SCOPE or --id-scope)",
                Reason.ID_SCOPE_MISSING,
            )
        return self.id_scope

    def trusted_ca_pem(self) -> str | None:
        if self.trusted_ca_file is None:
            return None
        try:
            text = self.trusted_ca_file.read_text()
        except OSError as exc:
            raise DeviceSettingsError(
                f"cannot read trusted CA file {self.trusted_ca_file}: {exc.strerror}",
                Reason.TRUSTED_CA_UNREADABLE,
            ) from exc
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise DeviceSettingsError(
                f"trusted CA file {self.trusted_ca_file} holds no PEM certificate", Reason.TRUSTED_CA_INVALID
            )
        return text


@dataclass(frozen=True)
class RuntimeSettings:
    telemetry_interval_s: float
    buffer_max_messages: int
    backoff_initial_s: float
    backoff_max_s: float
    first_attempt_window_s: float
    sdk_timeout_s: float
    give_up_after_s: float
    crl_check_interval_s: float = 3600.0


@dataclass(frozen=True)
class RenewalSettings:
    est_url: str | None = None  # None: renewal off
    ca_file: Path | None = None
    fraction: float = 0.667
    days_before: float = 30.0
    check_interval_s: float = 86400.0
    jitter: float = 0.1

    @property
    def enabled(self) -> bool:
        return bool(self.est_url)

    def trusted_ca_pem(self, factory_ca_file: Path | None) -> str | None:
        """The EST server's trust anchor: ``renewal.ca_file``, else the factory CA, else None (system)."""
        path = self.ca_file or factory_ca_file
        if path is None:
            return None
        try:
            text = path.read_text()
        except OSError as exc:
            raise DeviceSettingsError(
                f"cannot read the EST trust anchor {path}: {exc.strerror}", Reason.TRUSTED_CA_UNREADABLE
            ) from exc
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise DeviceSettingsError(
                f"EST trust anchor {path} holds no PEM certificate", Reason.TRUSTED_CA_INVALID
            )
        return text


@dataclass(frozen=True)
class Settings:
    state_root: Path
    factory: FactorySettings
    cloud: CloudSettings
    runtime: RuntimeSettings
    log_format: str
    device_ids: DeviceIdPolicy = DeviceIdPolicy.GUID
    renewal: RenewalSettings = RenewalSettings()


DEFAULTS: dict[str, Any] = {
    "state_root": "./device-state",
    "id_scope": None,
    "global_endpoint": "localhost",
    "trusted_ca_file": None,
    "factory_address": "127.0.0.1:50051",
    "factory_tls": "insecure",
    "factory_ca_file": None,
    "factory_client_cert_file": None,
    "factory_client_key_file": None,
    "factory_timeout_s": 15.0,
    "telemetry_interval_s": 5.0,
    "buffer_max_messages": 10_000,
    "backoff_initial_s": 2.0,
    "backoff_max_s": 120.0,
    "first_attempt_window_s": 0.0,
    "sdk_timeout_s": 30.0,
    "give_up_after_s": 0.0,
    "crl_check_interval_s": 3600.0,
    "log_format": "auto",
    "device_ids": DeviceIdPolicy.GUID.value,
    "renewal.est_url": None,
    "renewal.ca_file": None,
    "renewal.fraction": 0.667,
    "renewal.days_before": 30.0,
    "renewal.check_interval_s": 86400.0,
}
KEYS = frozenset(DEFAULTS)
# What a settings file may hold at its top level (``renewal.*`` keys live in a ``[renewal]`` table).
FILE_KEYS = frozenset(key.split(".")[0] for key in KEYS)

# Which command-line option sets which key (argparse dest -> key), for every command that has it.
FLAGS = FlagKeys(
    {
        "state_root": "state_root",
        "log_format": "log_format",
        "id_scope": "id_scope",
        "global_endpoint": "global_endpoint",
        "trusted_ca_file": "trusted_ca_file",
        # the factory connection: the options of every client of a service (provkit.channels); the TLS
        # mode follows from them: --ca-file alone is TLS, with --cert-file mTLS, --insecure plaintext
        "target": "factory_address",
        "ca_file": ("factory_ca_file", "factory_tls"),
        "cert_file": ("factory_client_cert_file", "factory_tls"),
        "key_file": "factory_client_key_file",
        "insecure": "factory_tls",
        "interval": "telemetry_interval_s",
        "buffer_max": "buffer_max_messages",
        "give_up_after": "give_up_after_s",
        "est_url": "renewal.est_url",
    },
    convert={
        "ca_file": lambda path: (path, FactoryTls.TLS.value),
        "cert_file": lambda path: (path, FactoryTls.MTLS.value),
        "insecure": lambda _: FactoryTls.INSECURE.value,
    },
)


def _num(source: SettingsSource, key: str, *, minimum: float, integer: bool = False) -> Any:
    raw = source.value(key)
    try:
        value = int(raw) if integer else float(raw)
    except (TypeError, ValueError) as exc:
        raise DeviceSettingsError(f"setting {key}: {raw!r} is not a number", Reason.SETTINGS_INVALID) from exc
    if value < minimum:
        raise DeviceSettingsError(
            f"setting {key}: must be at least {minimum}, got {value}", Reason.SETTINGS_INVALID
        )
    return value


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeviceSettingsError(f"factory_address {address!r} must be host:port", Reason.SETTINGS_INVALID)
    return address


def build_settings(source: SettingsSource) -> Settings:
    """Validate the layered values into :class:`Settings`."""
    tls_text = source.text("factory_tls", "")
    try:
        tls = FactoryTls(str(tls_text).lower())
    except ValueError as exc:
        raise DeviceSettingsError(
            f"factory_tls must be insecure, tls or mtls, got {tls_text!r}", Reason.SETTINGS_INVALID
        ) from exc
    factory = FactorySettings(
        address=_check_address(source.text("factory_address", "") or ""),
        tls=tls,
        ca_file=source.path("factory_ca_file"),
        client_cert_file=source.path("factory_client_cert_file"),
        client_key_file=source.path("factory_client_key_file"),
        timeout_s=_num(source, "factory_timeout_s", minimum=0.1),
    )
    if tls is FactoryTls.MTLS and (factory.client_cert_file is None or factory.client_key_file is None):
        raise DeviceSettingsError(
            "factory_tls=mtls needs factory_client_cert_file and factory_client_key_file",
            Reason.SETTINGS_INVALID,
        )
    if tls is FactoryTls.INSECURE:
        host = factory.address.rpartition(":")[0].strip("[]")
        if host != "localhost":
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise DeviceSettingsError(
                    f"factory_tls=insecure is only allowed for a loopback factory address, not {host!r}",
                    Reason.INSECURE_NOT_LOOPBACK,
                )
    cloud = CloudSettings(
        id_scope=source.text("id_scope") or None,
        global_endpoint=source.text("global_endpoint", "") or "",
        trusted_ca_file=source.path("trusted_ca_file"),
    )
    runtime = RuntimeSettings(
        telemetry_interval_s=_num(source, "telemetry_interval_s", minimum=0.01),
        buffer_max_messages=_num(source, "buffer_max_messages", minimum=1, integer=True),
        backoff_initial_s=_num(source, "backoff_initial_s", minimum=0.01),
        backoff_max_s=_num(source, "backoff_max_s", minimum=0.01),
        first_attempt_window_s=_num(source, "first_attempt_window_s", minimum=0.0),
        sdk_timeout_s=_num(source, "sdk_timeout_s", minimum=0.5),
        give_up_after_s=_num(source, "give_up_after_s", minimum=0.0),
        crl_check_interval_s=_num(source, "crl_check_interval_s", minimum=1.0),
    )
    if runtime.backoff_max_s < runtime.backoff_initial_s:
        raise DeviceSettingsError(
            "backoff_max_s must not be below backoff_initial_s", Reason.SETTINGS_INVALID
        )
    log_format = source.text("log_format", "") or ""
    if log_format not in ("auto", "json", "text"):
        raise DeviceSettingsError("log_format must be auto, json or text", Reason.SETTINGS_INVALID)
    try:
        device_ids = DeviceIdPolicy.parse(source.text("device_ids", "") or "")
    except ValueError as exc:
        raise DeviceSettingsError(f"setting device_ids: {exc}", Reason.SETTINGS_INVALID) from exc
    renewal = _renewal(source)
    return Settings(
        renewal=renewal,
        state_root=Path(source.text("state_root", "") or "").expanduser(),
        factory=factory,
        cloud=cloud,
        runtime=runtime,
        log_format=log_format,
        device_ids=device_ids,
    )


def _renewal(source: SettingsSource) -> RenewalSettings:
    est_url = (source.text("renewal.est_url", "") or "").strip().rstrip("/") or None
    if est_url is not None and not est_url.lower().startswith("https://"):
        raise DeviceSettingsError(
            f"setting renewal.est_url: {est_url!r} must be an https:// URL (the device authenticates "
            "with its certificate over TLS)",
            Reason.SETTINGS_INVALID,
        )
    fraction = _num(source, "renewal.fraction", minimum=0.01)
    if fraction > 1:
        raise DeviceSettingsError(
            f"setting renewal.fraction: a fraction of the lifetime, at most 1, got {fraction}",
            Reason.SETTINGS_INVALID,
        )
    return RenewalSettings(
        est_url=est_url,
        ca_file=source.path("renewal.ca_file"),
        fraction=fraction,
        days_before=_num(source, "renewal.days_before", minimum=0.0),
        check_interval_s=_num(source, "renewal.check_interval_s", minimum=1.0),
    )


def load_settings(
    *,
    env: Mapping[str, str],
    config_file: Path | None = None,
    device_settings: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the layers described in the module docstring.

    ``device_settings`` is the device's own settings.toml (used when it exists); ``overrides`` are the
    command-line values (``FLAGS.values(args)``; ``None`` values are ignored).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - KEYS)
    if unknown:
        raise DeviceSettingsError(f"unknown setting(s) {', '.join(unknown)}", Reason.SETTINGS_UNKNOWN_KEY)
    files: list[SettingsFile] = []
    try:
        config = config_file or (Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None)
        if config is not None:
            files.append(SettingsFile.read(config, what="config file", known=FILE_KEYS))
        if device_settings is not None and device_settings.exists():
            device = SettingsFile.read(device_settings, what="device settings", known=FILE_KEYS)
            files.append(device.without("state_root"))  # the state root locates this file
        source = SettingsSource(ENV_PREFIX, env, files, flags=overrides, defaults=DEFAULTS)
        return build_settings(source)
    except SettingsError as exc:
        raise DeviceSettingsError(str(exc), exc.reason) from exc


def state_root_from(*, env: Mapping[str, str], config_file: Path | None, override: str | None) -> Path:
    """The state root alone (needed before the device's own settings file can be located)."""
    return load_settings(env=env, config_file=config_file, overrides={"state_root": override}).state_root


def render_device_settings(values: Mapping[str, str]) -> bytes:
    """A device settings.toml with string values (TOML basic strings accept JSON string escapes); dotted
    keys (``renewal.est_url``) go into their table."""
    lines = ["# written by `device-client provision`; environment and flags take precedence"]
    known = sorted((key, value) for key, value in values.items() if key in KEYS)
    lines += [f"{key} = {json.dumps(str(value))}" for key, value in known if "." not in key]
    tables: dict[str, list[str]] = {}
    for key, value in known:
        if "." in key:
            table, _, name = key.partition(".")
            tables.setdefault(table, []).append(f"{name} = {json.dumps(str(value))}")
    for table, entries in tables.items():
        lines += ["", f"[{table}]", *entries]
    return ("\n".join(lines) + "\n").encode()
