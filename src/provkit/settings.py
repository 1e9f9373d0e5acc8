"""The suite's settings: ``mainkit.settings`` (the one loader: flags over the environment over a TOML file
over defaults) and the blocks both services read from it.

API
---
``SettingsSource``, ``SettingsFile``, ``FlagKeys``, ``Secret``, ``SettingsError``   from ``mainkit.settings``
    (see there): a dotted key ``"server.port"`` is read from a flag, the environment
    (``<PREFIX>_SERVER_PORT``), the TOML file (``[server] port = ...``), then the defaults.
``server_settings(source, section="server", error_domain=...) -> ServerSettings``   the shared
    ``[server]`` block: host, port, insecure, allow_insecure_non_loopback, grace_seconds, tls_cert_file,
    tls_key_file, client_ca_file, client_auth (none|require; optional is refused), insecure_identity (the
    ``urn:devprov:<role>:<tenant>`` every caller of an insecure server is taken for; unset: none).
``device_id_policy(source) -> DeviceIdPolicy``   the ``device_ids`` setting (see ``provkit.device_id``).
``request_lease(source) -> timedelta``   ``requests.lease_seconds`` (``<PREFIX>_REQUESTS_LEASE_SECONDS``,
    default 30): how long a replica's reservation of a request id lasts without renewal, i.e. how long a
    retry on another replica waits before taking over the request of a replica that died
    (``provkit.idempotency``).
``refusal_audit_settings(source) -> RefusalAuditSettings``   ``refusal_audit.window_seconds`` (default 60) and
    ``refusal_audit.max_kinds`` (default 10000): how refusals by callers nobody vouched for are written
    (``provkit.refusal_audit``).
``database_url(source, data_dir)``, ``database_url_set(source)``   where a service keeps its state.
``SettingsError``   a missing or malformed value (message names the env variable and the file key); a
    ``ConfigurationError`` (``mainkit.settings``, re-exported by ``provkit.errors``), as
    ``ServerConfigError`` and ``CloudNotConfigured`` are.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from dbstore import DatabaseUrl, UrlError
from mainkit.settings import FlagKeys, Secret, SettingsError, SettingsFile, SettingsSource
from provkit.device_id import DeviceIdPolicy
from provkit.grpc_server import ClientAuth, ServerConfigError, ServerSettings, ServerTLS
from provkit.idempotency import LEASE
from provkit.refusal_audit import RefusalAuditSettings

__all__ = [
    "FlagKeys",
    "Secret",
    "SettingsError",
    "SettingsFile",
    "SettingsSource",
    "database_url",
    "database_url_set",
    "device_id_policy",
    "refusal_audit_settings",
    "request_lease",
    "server_settings",
]


def server_settings(
    source: SettingsSource, section: str = "server", *, error_domain: str, default_port: int = 0
) -> ServerSettings:
    def key(name: str) -> str:
        return f"{section}.{name}"

    cert = source.path(key("tls_cert_file"))
    private = source.path(key("tls_key_file"))
    client_ca = source.path(key("client_ca_file"))
    tls = None
    if cert or private:
        if not (cert and private):
            raise SettingsError(f"{source.env_name(key('tls_cert_file'))} and ..._TLS_KEY_FILE go together")
        auth_text = source.text(key("client_auth"), "require" if client_ca else "none") or "none"
        if auth_text.lower() == "optional":
            # gRPC's Python server has no request-but-do-not-require mode: "optional" would never ask for a
            # certificate, and every party would be refused as anonymous.  Said here, not discovered later.
            raise SettingsError(
                f"{source.env_name(key('client_auth'))}=optional cannot be served: gRPC's Python server "
                "either requires a client certificate or never asks for one; choose require (parties) or none"
            )
        try:
            auth = ClientAuth(auth_text.lower())
        except ValueError:
            raise SettingsError(
                f"{source.env_name(key('client_auth'))} must be none or require, got {auth_text!r}"
            ) from None
        try:
            tls = ServerTLS(cert, private, client_ca, auth)
        except ServerConfigError as exc:
            raise SettingsError(str(exc)) from exc
    return ServerSettings(
        host=source.text(key("host"), "127.0.0.1") or "127.0.0.1",
        port=source.integer(key("port"), default_port),
        tls=tls,
        insecure=source.flag(key("insecure"), False),
        allow_insecure_non_loopback=source.flag(key("allow_insecure_non_loopback"), False),
        grace_seconds=source.number(key("grace_seconds"), 10.0),
        error_domain=error_domain,
        insecure_identity=source.text(key("insecure_identity"), "") or "",
    )


def device_id_policy(source: SettingsSource) -> DeviceIdPolicy:
    """Which device ids this program accepts: ``device_ids = "guid"`` (default) or ``"registration-id"``."""
    try:
        return DeviceIdPolicy.parse(source.text("device_ids", DeviceIdPolicy.GUID.value) or "guid")
    except ValueError as exc:
        raise SettingsError(f"{source.env_name('device_ids')} / device_ids: {exc}") from None


def request_lease(source: SettingsSource) -> timedelta:
    seconds = source.number("requests.lease_seconds", LEASE.total_seconds())
    if seconds <= 0:
        raise SettingsError(f"{source.env_name('requests.lease_seconds')} must be positive")
    return timedelta(seconds=seconds)


def refusal_audit_settings(source: SettingsSource) -> RefusalAuditSettings:
    default = RefusalAuditSettings()
    window = source.number("refusal_audit.window_seconds", default.window)
    kinds = source.integer("refusal_audit.max_kinds", default.max_kinds)
    try:
        return RefusalAuditSettings(window, kinds)
    except ValueError:
        raise SettingsError(
            f"{source.env_name('refusal_audit.window_seconds')} must be a positive (finite) number and "
            f"{source.env_name('refusal_audit.max_kinds')} at least 1, got {window:g} and {kinds}"
        ) from None


def database_url(source: SettingsSource, data_dir: Path) -> DatabaseUrl:
    """Where the service keeps its state: ``database_url`` (a secret, as it may hold a password; also read
    from ``<PREFIX>_DATABASE_URL_FILE``) = ``postgresql://user:password@host:port/database`` or
    ``sqlite:///<directory>``; default ``sqlite:///<data_dir>`` (the SQLite files in the data directory)."""
    return database_url_set(source) or DatabaseUrl.sqlite(data_dir)


def database_url_set(source: SettingsSource) -> DatabaseUrl | None:
    """``database_url`` as :func:`database_url` reads it, or None when it is not set."""
    secret = source.secret("database_url")
    if secret is None:
        return None
    try:
        return DatabaseUrl.parse(secret.reveal().strip())
    except UrlError as exc:
        raise SettingsError(f"{source.env_name('database_url')} / database_url: {exc}") from None
