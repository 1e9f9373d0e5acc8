"""The IoT Hub identity registry and twin storage (SQLite tables ``hub_devices`` and ``hub_twins``).

Synchronous on purpose: every method is a few local SQLite statements and joins the caller's
``db.transaction()``, so DPS can create the hub identity inside its own registration transaction
(:meth:`HubRegistry.provision_from_dps`) and an assignment is all-or-nothing.
"""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from azure_iot_emulator.hub import twin as twinmodel
from azure_iot_emulator.hub.timefmt import NEVER, azure_time
from azure_iot_emulator.store import Database

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS hub_devices (
        hub TEXT NOT NULL,
        device_id TEXT NOT NULL,
        generation_id TEXT NOT NULL,
        etag TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        status_updated TEXT NOT NULL,
        auth_type TEXT NOT NULL,
        primary_thumbprint TEXT,
        secondary_thumbprint TEXT,
        primary_key TEXT,
        secondary_key TEXT,
        iot_edge INTEGER NOT NULL DEFAULT 0,
        connection_state TEXT NOT NULL DEFAULT 'Disconnected',
        connection_state_updated TEXT NOT NULL,
        last_activity TEXT NOT NULL,
        created TEXT NOT NULL,
        PRIMARY KEY (hub, device_id)
    )""",
    """CREATE TABLE IF NOT EXISTS hub_twins (
        hub TEXT NOT NULL,
        device_id TEXT NOT NULL,
        twin_version INTEGER NOT NULL,
        tags TEXT NOT NULL,
        desired TEXT NOT NULL,
        desired_meta TEXT NOT NULL,
        desired_version INTEGER NOT NULL,
        reported TEXT NOT NULL,
        reported_meta TEXT NOT NULL,
        reported_version INTEGER NOT NULL,
        PRIMARY KEY (hub, device_id),
        FOREIGN KEY (hub, device_id) REFERENCES hub_devices (hub, device_id) ON DELETE CASCADE
    )""",
)

AUTH_TYPES = ("selfSigned", "certificateAuthority", "sas", "none")
CREATE_IDENTITY = "createDeviceIdentity"
DELETE_IDENTITY = "deleteDeviceIdentity"
REPLACE_TWIN = "replaceTwin"

# Called inside the transaction of an identity's creation (after it, with the twin as created), deletion
# (before it, the device still readable) or a twin replaced by DPS: (hub, device id, Azure's opType).
IdentityListener = Callable[[str, str, str], None]
STATUSES = ("enabled", "disabled")


class RegistryError(Exception):
    """A registry write that cannot be done; ``reason`` is stable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DeviceSpec:
    """What a caller may set on a device identity (service PUT /devices or DPS)."""

    device_id: str
    status: str = "enabled"
    status_reason: str | None = None
    auth_type: str = "selfSigned"
    primary_thumbprint: str | None = None
    secondary_thumbprint: str | None = None
    primary_key: str | None = None
    secondary_key: str | None = None
    iot_edge: bool = False


@dataclass(frozen=True)
class Device:
    hub: str
    device_id: str
    generation_id: str
    etag: str
    status: str
    status_reason: str | None
    status_updated: str
    auth_type: str
    primary_thumbprint: str | None
    secondary_thumbprint: str | None
    primary_key: str | None
    secondary_key: str | None
    iot_edge: bool
    connection_state: str
    connection_state_updated: str
    last_activity: str
    created: str = field(repr=False, default="")

    def to_json(self) -> dict[str, Any]:
        """The ``Device`` shape of the IoT Hub service API."""
        return {
            "deviceId": self.device_id,
            "generationId": self.generation_id,
            "etag": self.etag,
            "connectionState": self.connection_state,
            "status": self.status,
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": self.connection_state_updated,
            "statusUpdatedTime": self.status_updated,
            "lastActivityTime": self.last_activity,
            "cloudToDeviceMessageCount": 0,
            "authentication": {
                "symmetricKey": {"primaryKey": self.primary_key, "secondaryKey": self.secondary_key},
                "x509Thumbprint": {
                    "primaryThumbprint": self.primary_thumbprint,
                    "secondaryThumbprint": self.secondary_thumbprint,
                },
                "type": self.auth_type,
            },
            "capabilities": {"iotEdge": self.iot_edge},
            "deviceScope": None,
            "parentScopes": [],
        }

    def thumbprint_matches(self, sha1_hex: str, sha256_hex: str) -> bool:
        presented = {sha1_hex.upper(), sha256_hex.upper()}
        stored = {t.upper() for t in (self.primary_thumbprint, self.secondary_thumbprint) if t}
        return bool(presented & stored)


def twin_etag(version: int) -> str:
    return base64.b64encode(version.to_bytes(8, "big")).decode("ascii")


def _new_device_etag() -> str:
    return base64.b64encode(str(secrets.randbelow(10**9)).encode("ascii")).decode("ascii")


def _new_generation_id() -> str:
    return str(638_000_000_000_000_000 + secrets.randbelow(10**15))


def _norm_thumbprint(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    return value.replace(":", "").upper()


class HubRegistry:
    def __init__(self, db: Database, hub_hosts: Sequence[str], clock: Callable[[], datetime]) -> None:
        self._db = db
        self.hub_hosts = tuple(hub_hosts)
        self._clock = clock
        # called with (hub, device_id) after DPS moved a device away from that hub or changed its
        # certificate, so a live connection made with the old identity can be closed
        self.credential_listeners: list[Callable[[str, str], None]] = []
        # told of identity creations and deletions (and twins DPS replaced), in their transactions
        self.identity_listeners: list[IdentityListener] = []
        db.register_schema(*SCHEMA)

    # ------------------------------------------------------------------------------------------------ util
    @property
    def database(self) -> Database:
        """The emulator's database (the hub's other tables live there too, beside the registry's)."""
        return self._db

    def now(self) -> str:
        return azure_time(self._clock())

    def _check_hub(self, hub: str) -> None:
        if hub not in self.hub_hosts:
            raise RegistryError("UNKNOWN_HUB", f"{hub} is not a hub of this emulator")

    @staticmethod
    def _device_from_row(row: sqlite3.Row) -> Device:
        return Device(
            hub=row["hub"],
            device_id=row["device_id"],
            generation_id=row["generation_id"],
            etag=row["etag"],
            status=row["status"],
            status_reason=row["status_reason"],
            status_updated=row["status_updated"],
            auth_type=row["auth_type"],
            primary_thumbprint=row["primary_thumbprint"],
            secondary_thumbprint=row["secondary_thumbprint"],
            primary_key=row["primary_key"],
            secondary_key=row["secondary_key"],
            iot_edge=bool(row["iot_edge"]),
            connection_state=row["connection_state"],
            connection_state_updated=row["connection_state_updated"],
            last_activity=row["last_activity"],
            created=row["created"],
        )

    # ------------------------------------------------------------------------------------------ contract
    def provision_from_dps(
        self,
        *,
        hub: str,
        device_id: str,
        thumbprint_sha1: str | None,
        thumbprint_sha256: str | None,
        initial_twin: Mapping[str, Any] | None,
        apply_initial_twin: bool,
        symmetric_keys: tuple[str, str] | None = None,
    ) -> None:
        """Create or update ``device_id`` on ``hub`` as an enabled device: selfSigned X.509 with the leaf's
        SHA-1 as its primary thumbprint, or, given ``symmetric_keys`` (primary, secondary), a SAS device
        with those keys; with ``apply_initial_twin`` set its tags and desired properties from
        ``initial_twin``.  Removes the device from any other hub.  Joins the caller's transaction."""
        self._check_hub(hub)
        tags, desired = twinmodel.initial_twin_parts(initial_twin) if apply_initial_twin else ({}, {})
        # Validate before the first write.
        twinmodel.validate_patch(tags, what="tags")
        twinmodel.validate_patch(desired, what="desired")
        if symmetric_keys is not None:
            spec = DeviceSpec(
                device_id=device_id, status="enabled", auth_type="sas",
                primary_key=symmetric_keys[0], secondary_key=symmetric_keys[1],
            )
        elif thumbprint_sha1 is not None:
            spec = DeviceSpec(
                device_id=device_id, status="enabled", auth_type="selfSigned",
                primary_thumbprint=thumbprint_sha1, secondary_thumbprint=None,
            )
        else:
            raise ValueError("a DPS-provisioned device needs a thumbprint or symmetric keys")
        invalidated: list[tuple[str, str]] = []
        with self._db.transaction() as conn:
            moved = conn.execute(
                "SELECT hub FROM hub_devices WHERE device_id = ? AND hub <> ?", (device_id, hub)
            ).fetchall()
            invalidated += [(row["hub"], device_id) for row in moved]
            for row in moved:
                self._tell(row["hub"], device_id, DELETE_IDENTITY)
            conn.execute("DELETE FROM hub_devices WHERE device_id = ? AND hub <> ?", (device_id, hub))
            current = self.get_device(hub, device_id)
            if current is None:
                self.create_device(hub, spec, tell=False)  # told below, with its initial twin
            else:
                credentials = (current.auth_type, (current.primary_thumbprint or "").upper(),
                               current.primary_key, current.secondary_key)
                if credentials != (spec.auth_type, (spec.primary_thumbprint or "").upper(),
                                   spec.primary_key, spec.secondary_key):
                    invalidated.append((hub, device_id))
                self.update_device(hub, spec)
            if apply_initial_twin:
                twin = self.get_twin(hub, device_id)
                assert twin is not None
                updated, _ = twinmodel.apply_service_update(
                    twin, tags=tags, desired=desired, timestamp=self.now(), replace_all=True
                )
                self.save_twin(hub, device_id, updated)
                if current is not None:
                    self._tell(hub, device_id, REPLACE_TWIN)
            if current is None:
                self._tell(hub, device_id, CREATE_IDENTITY)
        for where, who in invalidated:
            for listener in self.credential_listeners:
                listener(where, who)

    def _tell(self, hub: str, device_id: str, op_type: str) -> None:
        for listener in self.identity_listeners:
            listener(hub, device_id, op_type)

    def device_exists(self, hub: str, device_id: str) -> bool:
        return (
            self._db.query_one("SELECT 1 FROM hub_devices WHERE hub = ? AND device_id = ?", (hub, device_id))
            is not None
        )

    # ------------------------------------------------------------------------------------------- devices
    def get_device(self, hub: str, device_id: str) -> Device | None:
        row = self._db.query_one(
            "SELECT * FROM hub_devices WHERE hub = ? AND device_id = ?", (hub, device_id)
        )
        return None if row is None else self._device_from_row(row)

    def list_devices(self, hub: str, limit: int | None = None) -> list[Device]:
        sql = "SELECT * FROM hub_devices WHERE hub = ? ORDER BY device_id"
        params: tuple[object, ...] = (hub,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (hub, limit)
        return [self._device_from_row(row) for row in self._db.query(sql, params)]

    def create_device(self, hub: str, spec: DeviceSpec, *, tell: bool = True) -> Device:
        """``tell``: tell the identity listeners (the caller does when it goes on writing the device)."""
        self._check_hub(hub)
        now = self.now()
        with self._db.transaction() as conn:
            if self.device_exists(hub, spec.device_id):
                raise RegistryError("DEVICE_ALREADY_EXISTS", f"device {spec.device_id} already exists")
            conn.execute(
                """INSERT INTO hub_devices (hub, device_id, generation_id, etag, status, status_reason,
                   status_updated, auth_type, primary_thumbprint, secondary_thumbprint, primary_key,
                   secondary_key, iot_edge, connection_state, connection_state_updated, last_activity,
                   created)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'Disconnected', ?, ?, ?)""",
                (
                    hub,
                    spec.device_id,
                    _new_generation_id(),
                    _new_device_etag(),
                    spec.status,
                    spec.status_reason,
                    now,
                    spec.auth_type,
                    _norm_thumbprint(spec.primary_thumbprint),
                    _norm_thumbprint(spec.secondary_thumbprint),
                    spec.primary_key,
                    spec.secondary_key,
                    int(spec.iot_edge),
                    NEVER,
                    NEVER,
                    now,
                ),
            )
            self.save_twin(hub, spec.device_id, twinmodel.new_twin(now))
            if tell:
                self._tell(hub, spec.device_id, CREATE_IDENTITY)
        device = self.get_device(hub, spec.device_id)
        assert device is not None
        return device

    def update_device(self, hub: str, spec: DeviceSpec) -> Device:
        now = self.now()
        with self._db.transaction() as conn:
            current = self.get_device(hub, spec.device_id)
            if current is None:
                raise RegistryError("DEVICE_NOT_FOUND", f"device {spec.device_id} not registered")
            status_updated = now if current.status != spec.status else current.status_updated
            conn.execute(
                """UPDATE hub_devices SET etag = ?, status = ?, status_reason = ?, status_updated = ?,
                   auth_type = ?, primary_thumbprint = ?, secondary_thumbprint = ?, primary_key = ?,
                   secondary_key = ?, iot_edge = ? WHERE hub = ? AND device_id = ?""",
                (
                    _new_device_etag(),
                    spec.status,
                    spec.status_reason,
                    status_updated,
                    spec.auth_type,
                    _norm_thumbprint(spec.primary_thumbprint),
                    _norm_thumbprint(spec.secondary_thumbprint),
                    spec.primary_key,
                    spec.secondary_key,
                    int(spec.iot_edge),
                    hub,
                    spec.device_id,
                ),
            )
        device = self.get_device(hub, spec.device_id)
        assert device is not None
        return device

    def delete_device(self, hub: str, device_id: str) -> bool:
        with self._db.transaction() as conn:
            if self.device_exists(hub, device_id):
                self._tell(hub, device_id, DELETE_IDENTITY)
            cursor = conn.execute("DELETE FROM hub_devices WHERE hub = ? AND device_id = ?", (hub, device_id))
            return cursor.rowcount > 0

    def set_connection_state(self, hub: str, device_id: str, connected: bool) -> None:
        now = self.now()
        with self._db.transaction() as conn:
            conn.execute(
                """UPDATE hub_devices SET connection_state = ?, connection_state_updated = ?,
                   last_activity = CASE WHEN ? THEN ? ELSE last_activity END
                   WHERE hub = ? AND device_id = ?""",
                ("Connected" if connected else "Disconnected", now, connected, now, hub, device_id),
            )

    def touch_activity(self, hub: str, device_id: str) -> None:
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE hub_devices SET last_activity = ? WHERE hub = ? AND device_id = ?",
                (self.now(), hub, device_id),
            )

    @staticmethod
    def record_activity(conn: sqlite3.Connection, senders: set[tuple[str, str]], when: str) -> None:
        """Inside the telemetry commit: each sender's lastActivityTime is the enqueue time of its message."""
        conn.executemany(
            "UPDATE hub_devices SET last_activity = ? WHERE hub = ? AND device_id = ?",
            [(when, hub, device_id) for hub, device_id in sorted(senders)],
        )

    def reset_connection_states(self) -> None:
        """At start-up nobody is connected yet."""
        now = self.now()
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE hub_devices SET connection_state = 'Disconnected', connection_state_updated = ? "
                "WHERE connection_state <> 'Disconnected'",
                (now,),
            )

    # --------------------------------------------------------------------------------------------- twins
    def get_twin(self, hub: str, device_id: str) -> twinmodel.Twin | None:
        row = self._db.query_one("SELECT * FROM hub_twins WHERE hub = ? AND device_id = ?", (hub, device_id))
        if row is None:
            return None
        return twinmodel.Twin(
            tags=json.loads(row["tags"]),
            desired=twinmodel.Section(
                json.loads(row["desired"]), json.loads(row["desired_meta"]), row["desired_version"]
            ),
            reported=twinmodel.Section(
                json.loads(row["reported"]), json.loads(row["reported_meta"]), row["reported_version"]
            ),
            version=row["twin_version"],
        )

    def save_twin(self, hub: str, device_id: str, twin: twinmodel.Twin) -> None:
        with self._db.transaction() as conn:
            conn.execute(
                """INSERT INTO hub_twins (hub, device_id, twin_version, tags, desired, desired_meta,
                   desired_version, reported, reported_meta, reported_version)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (hub, device_id) DO UPDATE SET twin_version = excluded.twin_version,
                   tags = excluded.tags, desired = excluded.desired, desired_meta = excluded.desired_meta,
                   desired_version = excluded.desired_version, reported = excluded.reported,
                   reported_meta = excluded.reported_meta, reported_version = excluded.reported_version""",
                (
                    hub,
                    device_id,
                    twin.version,
                    json.dumps(twin.tags),
                    json.dumps(twin.desired.props),
                    json.dumps(twin.desired.metadata),
                    twin.desired.version,
                    json.dumps(twin.reported.props),
                    json.dumps(twin.reported.metadata),
                    twin.reported.version,
                ),
            )

    def twin_json(self, device: Device, twin: twinmodel.Twin) -> dict[str, Any]:
        """The ``Twin`` shape of the IoT Hub service API."""
        return {
            "deviceId": device.device_id,
            "etag": twin_etag(twin.version),
            "deviceEtag": device.etag,
            "status": device.status,
            "statusReason": device.status_reason,
            "statusUpdateTime": device.status_updated,
            "connectionState": device.connection_state,
            "lastActivityTime": device.last_activity,
            "cloudToDeviceMessageCount": 0,
            "authenticationType": device.auth_type,
            "x509Thumbprint": {
                "primaryThumbprint": device.primary_thumbprint,
                "secondaryThumbprint": device.secondary_thumbprint,
            },
            "modelId": "",
            "version": twin.version,
            "tags": twin.tags,
            "properties": {"desired": twin.desired.document(), "reported": twin.reported.document()},
            "capabilities": {"iotEdge": device.iot_edge},
        }


def device_spec_from_json(device_id: str, body: Mapping[str, Any]) -> DeviceSpec:
    """Parse a service ``Device`` body; raises RegistryError("ARGUMENT_INVALID", ...)."""
    if not isinstance(body, Mapping):
        raise RegistryError("ARGUMENT_INVALID", "device body must be a JSON object")
    body_id = body.get("deviceId")
    if body_id is not None and body_id != device_id:
        raise RegistryError(
            "ARGUMENT_INVALID", f"deviceId {body_id!r} in body does not match {device_id!r} in URL"
        )
    status = body.get("status") or "enabled"
    if status not in STATUSES:
        raise RegistryError("ARGUMENT_INVALID", f"status must be one of {', '.join(STATUSES)}")
    auth = body.get("authentication") or {}
    if not isinstance(auth, Mapping):
        raise RegistryError("ARGUMENT_INVALID", "authentication must be an object")
    x509 = auth.get("x509Thumbprint") or {}
    keys = auth.get("symmetricKey") or {}
    if not isinstance(x509, Mapping) or not isinstance(keys, Mapping):
        raise RegistryError("ARGUMENT_INVALID", "authentication.x509Thumbprint/symmetricKey must be objects")
    primary, secondary = x509.get("primaryThumbprint"), x509.get("secondaryThumbprint")
    auth_type = auth.get("type") or ("selfSigned" if primary else "sas")
    if auth_type not in AUTH_TYPES:
        raise RegistryError("ARGUMENT_INVALID", f"authentication.type must be one of {', '.join(AUTH_TYPES)}")
    for name, value in (("primaryThumbprint", primary), ("secondaryThumbprint", secondary)):
        if value is None or value == "":
            continue
        cleaned = str(value).replace(":", "")
        if len(cleaned) not in (40, 64) or any(c not in "0123456789abcdefABCDEF" for c in cleaned):
            raise RegistryError(
                "ARGUMENT_INVALID", f"{name} must be a SHA-1 (40) or SHA-256 (64) hex thumbprint"
            )
    if auth_type == "selfSigned" and not primary:
        raise RegistryError("ARGUMENT_INVALID", "selfSigned authentication needs a primaryThumbprint")
    primary_key, secondary_key = keys.get("primaryKey"), keys.get("secondaryKey")
    if auth_type == "sas":
        primary_key = primary_key or base64.b64encode(secrets.token_bytes(32)).decode("ascii")
        secondary_key = secondary_key or base64.b64encode(secrets.token_bytes(32)).decode("ascii")
    capabilities = body.get("capabilities") or {}
    return DeviceSpec(
        device_id=device_id,
        status=status,
        status_reason=body.get("statusReason"),
        auth_type=auth_type,
        primary_thumbprint=primary if auth_type == "selfSigned" else None,
        secondary_thumbprint=secondary if auth_type == "selfSigned" else None,
        primary_key=primary_key if auth_type == "sas" else None,
        secondary_key=secondary_key if auth_type == "sas" else None,
        iot_edge=bool(capabilities.get("iotEdge", False)) if isinstance(capabilities, Mapping) else False,
    )
