"""Settings resolved once at start-up from a TOML file and the environment (environment wins).

API
---
``SettingsSource(prefix, env=os.environ, file=None)``  one program's configuration source.  A dotted key
    ``"server.port"`` is read from the environment as ``<PREFIX>_SERVER_PORT`` and from the TOML file as
    ``[server] port = ...``.
    ``.text(key, default=None)``, ``.integer(key, default)``, ``.number(key, default)``,
    ``.flag(key, default)``, ``.path(key, default=None)`` (relative paths resolve against the file's folder)
    ``.secret(key) -> Secret | None``  from ``<PREFIX>_<KEY>`` or a file named by ``<PREFIX>_<KEY>_FILE`` /
        ``key_file`` in TOML; never from argv.  ``Secret.reveal()`` gives the value; ``repr`` hides it.
``server_settings(source, section="server", error_domain=...) -> ServerSettings``   the shared
    ``[server]`` block: host, port, insecure, allow_insecure_non_loopback, grace_seconds, tls_cert_file,
    tls_key_file, client_ca_file, client_auth (none|optional|require), insecure_identity (the
    ``urn:devprov:<role>:<tenant>`` every caller of an insecure server is taken for; unset: none).
``device_id_policy(source) -> DeviceIdPolicy``   the ``device_ids`` setting (see ``provkit.device_id``).
``request_lease(source) -> timedelta``   ``requests.lease_seconds`` (``<PREFIX>_REQUESTS_LEASE_SECONDS``,
    default 30): how long a replica's reservation of a request id lasts without renewal, i.e. how long a
    retry on another replica waits before taking over the request of a replica that died
    (``provkit.idempotency``).
``SettingsError``   a missing or malformed value (message names the env variable and the file key); a
    ``provkit.errors.ConfigurationError``, as ``ServerConfigError`` and ``CloudNotConfigured`` are.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from dbstore import DatabaseUrl, UrlError
from provkit.device_id import DeviceIdPolicy
from provkit.errors import ConfigurationError
from provkit.grpc_server import ClientAuth, ServerConfigError, ServerSettings, ServerTLS
from provkit.idempotency import LEASE

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ConfigurationError, ValueError):
    pass


@dataclass(frozen=True)
class Secret:
    value: str = ""

    def reveal(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return "Secret(****)"

    __str__ = __repr__


class SettingsSource:
    def __init__(self, prefix: str, env: Mapping[str, str] | None = None, file: Path | None = None) -> None:
        self.prefix = prefix.upper().rstrip("_")
        self.env = dict(os.environ if env is None else env)
        self.file = file
        self._data: dict[str, Any] = {}
        if file is not None:
            try:
                with file.open("rb") as handle:
                    self._data = tomllib.load(handle)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise SettingsError(f"cannot read settings file {file}: {exc}") from exc

    def env_name(self, key: str) -> str:
        return f"{self.prefix}_{key.upper().replace('.', '_').replace('-', '_')}"

    def _from_file(self, key: str) -> Any:
        node: Any = self._data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def _raw(self, key: str) -> Any:
        name = self.env_name(key)
        if name in self.env:
            return self.env[name]
        return self._from_file(key)

    def _describe(self, key: str) -> str:
        return f"{self.env_name(key)} / {key}"

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self._raw(key)
        return default if value is None else str(value)

    def integer(self, key: str, default: int) -> int:
        value = self._raw(key)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{self._describe(key)} must be an integer, got {value!r}") from None

    def number(self, key: str, default: float) -> float:
        value = self._raw(key)
        if value is None or value == "":
            return default
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{self._describe(key)} must be a number, got {value!r}") from None

    def flag(self, key: str, default: bool) -> bool:
        value = self._raw(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise SettingsError(f"{self._describe(key)} must be true or false, got {value!r}")

    def path(self, key: str, default: Path | None = None) -> Path | None:
        name = self.env_name(key)
        if name in self.env:
            return Path(self.env[name]).expanduser() if self.env[name] else default
        value = self._from_file(key)
        if value is None or value == "":
            return default
        path = Path(str(value)).expanduser()
        if not path.is_absolute() and self.file is not None:
            path = self.file.parent / path
        return path

    def secret(self, key: str) -> Secret | None:
        name = self.env_name(key)
        if self.env.get(name):
            return Secret(self.env[name])
        secret_file = self.path(f"{key}_file")
        if secret_file is None:
            return None
        try:
            return Secret(secret_file.read_text().rstrip("\r\n"))
        except OSError as exc:
            raise SettingsError(f"cannot read secret file for {name}: {exc}") from exc


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
        try:
            auth = ClientAuth(auth_text.lower())
        except ValueError:
            raise SettingsError(
                f"{source.env_name(key('client_auth'))} must be none, optional or require, got {auth_text!r}"
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
