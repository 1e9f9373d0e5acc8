"""The services' view of the cloud (DPS and its linked IoT hubs): typed records, small ports, errors and the
cloud settings.  No Azure SDK import here: the adapters (``provkit.dps``, ``provkit.iothub``) implement the
ports, the domains (enrollment, activation) only know this module.

API
---
Records (what the domains read and write; no DPS or hub JSON leaves the adapters):
    ``Enrollment`` (attestation, provisioning status, owner, activation-code hash, activation record,
    initial twin, hub allocation, etag; ``unmodelled`` keeps what the suite does not use, so an update
    writes it back untouched), ``X509Attestation``, ``ProvisioningStatus``, ``InitialTwin``,
    ``HubAllocation``, ``ActivationRecord``, ``RegistrationState``, ``BulkItemError``, ``EnrollmentGroup``
    (group mode); ``slot_sha256(pem, reported)`` (a slot's certificate thumbprint);
    ``HubDevice`` / ``HubDeviceStatus``, ``TwinDocument`` (a twin's tags and desired properties),
    ``TwinPatch``.
Ports (Protocols): ``EnrollmentPort`` (get / create / update / bulk_create / bulk_update),
    ``HubTwinPort`` (get_device / get_twin_document / patch_twin / set_device_status);
    ``disable_hub_device(hubs, hub, device_id)`` (the etag-guarded disable both services use).
``CloudNotConfigured`` (a SettingsError): nothing configured and no default emulator file.
Errors: ``CloudError`` and ``CloudNotFound``, ``CloudAlreadyExists`` (409), ``CloudEtagMismatch`` (412),
    ``CloudRejected`` (other 4xx: bad body, unauthorised), ``CloudUnavailable`` (cannot reach the service,
    or 5xx / 429 after the SDK's own retries; ``retry_after`` seconds when known).
Settings: ``DpsConfig``, ``HubConfig``, ``CloudSettings``;
    ``load_cloud_settings(source, section="cloud")``.

Settings keys (TOML section ``[cloud]``; environment ``<PREFIX>_CLOUD_<KEY>``, PREFIX e.g. FACTORY or
ACTIVATION):

- ``emulator_connection_file``: the emulator's connection.json (default ``.iot-emulator/connection.json``
  when no DPS connection string is set); supplies everything below that is not set explicitly.
- ``dps_connection_string`` (secret: env, or ``..._FILE`` / ``dps_connection_string_file``).
- ``ca_file``: CA (PEM) to trust for the REST calls (the emulator's CA; unset: system roots).
- ``hub_connection_strings`` (secret, comma or newline separated; or ``..._FILE``): linked hubs.
- ``default_hub``: host name of the default hub (default: the emulator's, else the first hub).
- ``id_scope``: DPS ID scope (informational).
- ``retry_total`` (4), ``retry_backoff_max`` (10 s), ``timeout_seconds`` (5 s, connect timeout).

Explicit values win over the emulator file; with no explicit DPS connection string the emulator file is
required (real Azure: set the connection strings and leave the emulator file out, or point it elsewhere).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from provkit.settings import Secret, SettingsError, SettingsSource

DEFAULT_EMULATOR_CONNECTION_FILE = Path(".iot-emulator") / "connection.json"


# ------------------------------------------------------------------------------------------------ errors
class CloudError(Exception):
    """A failed call to DPS or a hub.  ``status`` is the HTTP status when there was a response."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class CloudNotFound(CloudError):
    pass


class CloudAlreadyExists(CloudError):
    pass


class CloudEtagMismatch(CloudError):
    pass


class CloudRejected(CloudError):
    pass


class CloudUnavailable(CloudError):
    pass


# ----------------------------------------------------------------------------------------------- records
class ProvisioningStatus(enum.Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"


@dataclass(frozen=True)
class RegistrationState:
    registration_id: str
    status: str  # unassigned | assigning | assigned | failed | disabled
    assigned_hub: str | None = None
    device_id: str | None = None
    last_updated: datetime | None = None

    @property
    def assigned(self) -> bool:
        return self.status == "assigned" and bool(self.assigned_hub)


@dataclass(frozen=True)
class X509Attestation:
    """The enrollment's X.509 attestation: its primary client certificate and, while a device changes
    certificates (renewal), a secondary one DPS accepts as well.  The thumbprints are what the service
    reports about the certificates it holds (read-only; real DPS may omit the PEM itself)."""

    certificate_pem: str | None = None
    sha256_thumbprint: str | None = None
    secondary_pem: str | None = None
    secondary_sha256_thumbprint: str | None = None


def slot_sha256(pem: str | None, reported: str | None = None) -> str | None:
    """The upper-case SHA-256 thumbprint of an attestation slot's certificate (its PEM, else the one DPS
    reports); None for an empty slot."""
    if pem and "BEGIN CERTIFICATE" in pem:
        try:
            return x509.load_pem_x509_certificate(pem.encode()).fingerprint(hashes.SHA256()).hex().upper()
        except ValueError:
            pass
    return reported.upper() if reported else None


@dataclass(frozen=True)
class InitialTwin:
    """Tags and desired properties a device's hub twin starts with (service metadata stripped)."""

    tags: Mapping[str, Any] = field(default_factory=dict)
    desired: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HubAllocation:
    """Which linked hubs a registration may land on; ``policy`` is DPS's allocation policy name
    (``static``, ``hashed``, ``geoLatency``, ``custom``) or None for the service default."""

    iot_hubs: tuple[str, ...] = ()
    policy: str | None = None


@dataclass(frozen=True)
class ActivationRecord:
    """What activation_svc wrote about the device's activation (kept with the enrollment)."""

    activated_at: datetime | None = None
    deactivated_at: datetime | None = None
    registered_hub: str | None = None  # the hub the device was registered on when deactivated


@dataclass(frozen=True)
class Unmodelled:
    """The enrollment as the service sent it, for the adapter only: the parts the suite does not model
    (and the sections the domain leaves unchanged) are written back from here exactly as they were read.
    Empty for an enrollment the domain builds from scratch."""

    document: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Enrollment:
    """An individual enrollment as the domain reads and writes it.  ``etag``, ``registration_state`` and
    ``last_updated`` are read-only (set by the service); an update is guarded by ``etag``."""

    registration_id: str
    attestation: X509Attestation = field(default_factory=X509Attestation)
    provisioning_status: ProvisioningStatus = ProvisioningStatus.ENABLED
    device_id: str | None = None
    code_hash: Mapping[str, Any] | None = None  # provkit.activation_code's record
    owner: str | None = None  # the OEM that owns the device (only its parties may activate it)
    activation: ActivationRecord = field(default_factory=ActivationRecord)
    initial_twin: InitialTwin | None = None
    allocation: HubAllocation = field(default_factory=HubAllocation)
    etag: str | None = None
    registration_state: RegistrationState | None = None
    last_updated: datetime | None = None
    unmodelled: Unmodelled = field(default_factory=Unmodelled, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.provisioning_status is ProvisioningStatus.ENABLED


def parse_azure_time(text: str) -> datetime | None:
    """Azure's timestamps (``2024-05-01T10:11:12.1234567Z``, ``0001-01-01T00:00:00Z`` = never)."""
    value = text.strip()
    if not value or value.startswith("0001-01-01"):
        return None
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    if "." in value:
        head, _, rest = value.partition(".")
        count = len(rest) - len(rest.lstrip("0123456789"))
        digits, zone = rest[:count], rest[count:]
        value = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment


@dataclass(frozen=True)
class BulkItemError:
    """One record a bulk operation did not write; ``error`` is ``CloudAlreadyExists``, ``CloudEtagMismatch``
    or ``CloudRejected``."""

    registration_id: str
    error: CloudError


@dataclass(frozen=True)
class EnrollmentGroup:
    """An X.509 enrollment group as the suite writes it (group mode): devices whose chain leads to
    ``signing_certificate_pem`` register; DPS asks the custom allocation webhook at ``webhook_url`` (its
    function key in the query) which of ``iot_hubs`` each goes to.  ``etag`` is read-only; an update is
    guarded by it.  ``signing_sha256`` is the thumbprint DPS reports for the signing certificate."""

    group_id: str
    signing_certificate_pem: str | None
    webhook_url: str
    iot_hubs: tuple[str, ...]
    enabled: bool = True
    api_version: str = "2021-10-01"
    etag: str | None = None
    signing_sha256: str | None = None
    unmodelled: Unmodelled = field(default_factory=Unmodelled, compare=False, repr=False)


class HubDeviceStatus(enum.Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"


@dataclass(frozen=True)
class HubDevice:
    device_id: str
    hub: str
    status: HubDeviceStatus
    connection_state: str
    last_activity: datetime | None
    etag: str | None
    primary_thumbprint: str | None
    secondary_thumbprint: str | None


@dataclass(frozen=True)
class TwinDocument:
    """A hub twin as the domain sees it: tags and desired properties without ``$metadata`` / ``$version``."""

    etag: str | None
    tags: Mapping[str, Any]
    desired: Mapping[str, Any]


@dataclass(frozen=True)
class TwinPatch:
    """A merge patch of tags and desired properties; a ``None`` value deletes the key."""

    tags: Mapping[str, Any] = field(default_factory=dict)
    desired: Mapping[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.tags or self.desired)


# ------------------------------------------------------------------------------------------------- ports
class EnrollmentPort(Protocol):
    async def get(self, registration_id: str) -> Enrollment | None: ...

    async def create(self, enrollment: Enrollment) -> Enrollment:
        """Create; ``CloudAlreadyExists`` when the id is taken."""
        ...

    async def update(self, enrollment: Enrollment) -> Enrollment:
        """Replace the record if its etag still is ``enrollment.etag``; ``CloudEtagMismatch`` otherwise."""
        ...

    async def bulk_create(self, enrollments: Sequence[Enrollment]) -> list[BulkItemError]:
        """At most 10 records in one call; the per-record failures (empty: all created)."""
        ...

    async def bulk_update(self, enrollments: Sequence[Enrollment]) -> list[BulkItemError]:
        """At most 10 records in one call, each replaced if its etag still is ``enrollment.etag``
        (``updateIfMatchETag``); the per-record failures (``CloudEtagMismatch``: changed or gone since)."""
        ...


class HubTwinPort(Protocol):
    async def get_device(self, hub: str, device_id: str) -> HubDevice | None: ...

    async def get_twin_document(self, hub: str, device_id: str) -> TwinDocument | None: ...

    async def patch_twin(self, hub: str, device_id: str, patch: TwinPatch, etag: str) -> None:
        """Merge-patch tags and desired properties if the twin etag matches."""
        ...

    async def set_device_status(self, hub: str, device: HubDevice, status: HubDeviceStatus) -> None:
        """Enable or disable the device identity (etag-guarded by ``device.etag``)."""
        ...


async def disable_hub_device(hubs: HubTwinPort, hub: str, device_id: str, attempts: int = 5) -> bool | None:
    """Disable a device identity on a hub (etag-guarded, retried on a concurrent change): True when this
    call disabled it, False when it is absent or disabled already, None when every attempt lost to a
    concurrent change.  Cloud errors propagate."""
    for _ in range(attempts):
        device = await hubs.get_device(hub, device_id)
        if device is None or device.status is HubDeviceStatus.DISABLED:
            return False
        try:
            await hubs.set_device_status(hub, device, HubDeviceStatus.DISABLED)
        except CloudEtagMismatch:
            continue
        return True
    return None


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DpsConfig:
    connection_string: Secret
    ca_file: Path | None = None
    retry_total: int = 4
    retry_backoff_max: float = 10.0
    timeout_seconds: float = 5.0

    @property
    def host_name(self) -> str:
        return parse_connection_string(self.connection_string.reveal()).get("hostname", "")


@dataclass(frozen=True)
class HubConfig:
    host_name: str  # as devices know the hub (DPS's assignedHub)
    connection_string: Secret


@dataclass(frozen=True)
class CloudSettings:
    dps: DpsConfig
    hubs: tuple[HubConfig, ...] = ()
    default_hub: str | None = None
    id_scope: str | None = None
    global_endpoint: str | None = None
    source: str = "explicit"  # or the emulator connection file it came from
    extra_ca_pem: str | None = field(default=None, repr=False)

    def hub(self, host_name: str) -> HubConfig | None:
        wanted = host_name.lower()
        return next((h for h in self.hubs if h.host_name.lower() == wanted), None)

    @property
    def hub_names(self) -> tuple[str, ...]:
        return tuple(h.host_name for h in self.hubs)


def parse_connection_string(text: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    for item in text.split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise SettingsError("a connection string is a ';'-separated list of key=value pairs")
        parts[key.strip().lower()] = value.strip()
    return parts


def _hub_name_from_connection_string(text: str) -> str:
    host = parse_connection_string(text).get("hostname", "")
    if not host:
        raise SettingsError("a hub connection string has no HostName")
    return host


class CloudNotConfigured(SettingsError):
    """Neither connection strings nor the (default) emulator connection file are there."""


def _read_emulator_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read the emulator connection file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("dps"), dict):
        raise SettingsError(f"{path} is not an emulator connection file (no 'dps' entry)")
    return data


def load_cloud_settings(source: SettingsSource, section: str = "cloud") -> CloudSettings:
    def key(name: str) -> str:
        return f"{section}.{name}"

    explicit_dps = source.secret(key("dps_connection_string"))
    emulator_file = source.path(key("emulator_connection_file"))
    if emulator_file is None and explicit_dps is None:
        emulator_file = DEFAULT_EMULATOR_CONNECTION_FILE
        if not emulator_file.exists():
            raise CloudNotConfigured(
                f"no cloud configured: set {source.env_name(key('dps_connection_string'))} (and the hubs) or "
                f"{source.env_name(key('emulator_connection_file'))}; {emulator_file} does not exist"
            )
    emulator: dict[str, Any] = _read_emulator_file(emulator_file) if emulator_file is not None else {}

    ca_file = source.path(key("ca_file"))
    if ca_file is None and emulator.get("ca_pem_path"):
        ca_file = Path(emulator["ca_pem_path"])
    dps_secret = explicit_dps or (
        Secret(emulator["dps"]["connection_string"]) if emulator.get("dps") else None
    )
    if dps_secret is None or not dps_secret.reveal():
        name = source.env_name(key("dps_connection_string"))
        raise SettingsError(f"set {name} or an emulator connection file")
    parse_connection_string(dps_secret.reveal())

    hubs: list[HubConfig] = []
    explicit_hubs = source.secret(key("hub_connection_strings"))
    if explicit_hubs is not None:
        for item in explicit_hubs.reveal().replace("\n", ",").split(","):
            if item.strip():
                hubs.append(HubConfig(_hub_name_from_connection_string(item), Secret(item.strip())))
    else:
        for hub in emulator.get("hubs") or ():
            hubs.append(HubConfig(str(hub["host_name"]), Secret(str(hub["connection_string"]))))
    default_hub = (
        source.text(key("default_hub"))
        or emulator.get("default_hub")
        or (hubs[0].host_name if hubs else None)
    )
    if default_hub and hubs and not any(h.host_name.lower() == default_hub.lower() for h in hubs):
        raise SettingsError(f"the default hub {default_hub!r} is not among the configured hubs")
    retry_total = source.integer(key("retry_total"), 4)
    if retry_total < 0:
        raise SettingsError(f"{source.env_name(key('retry_total'))} must not be negative")
    return CloudSettings(
        dps=DpsConfig(
            dps_secret,
            ca_file,
            retry_total=retry_total,
            retry_backoff_max=source.number(key("retry_backoff_max"), 10.0),
            timeout_seconds=source.number(key("timeout_seconds"), 5.0),
        ),
        hubs=tuple(hubs),
        default_hub=default_hub,
        id_scope=source.text(key("id_scope")) or emulator.get("id_scope"),
        global_endpoint=emulator.get("global_endpoint"),
        source=str(emulator_file) if emulator else "explicit",
    )
