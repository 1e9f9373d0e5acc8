"""The DPS domain: enrollment CRUD with etags, bulk, query, registration states, and device
registration (attestation checks, hub allocation, hub identity + registration state in one transaction).

Synchronous but for a registration whose enrollment calls a custom allocation webhook: every operation is
a few local SQLite statements run between awaits; such a registration reads, awaits the webhook
(``allocation.py``), then writes in one transaction."""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509

from azure_iot_emulator.dps import attestation, model
from azure_iot_emulator.dps.allocation import (
    GROUP,
    INDIVIDUAL,
    Allocation,
    AllocationFailed,
    CustomAllocationWebhook,
    allocation_request,
    builtin_hub,
    linked_hubs,
)
from azure_iot_emulator.dps.attestation import DeviceCredentials, Match
from azure_iot_emulator.dps.certinfo import thumbprints
from azure_iot_emulator.dps.errors import (
    DpsError,
    azure_time,
    bad_request,
    conflict,
    not_found,
    precondition_failed,
)
from azure_iot_emulator.hub import twin as twinmodel
from azure_iot_emulator.hub.registry import RegistryError
from azure_iot_emulator.store import Database

GROUP_OF_STATE = (
    "lower(coalesce(json_extract(body, '$.x509.enrollmentGroupId'),"
    " json_extract(body, '$.symmetricKey.enrollmentGroupId')))"
)

# Individual enrollments and enrollment groups: one row per record, keyed by its lower-case id.
_RECORDS = """CREATE TABLE IF NOT EXISTS {} (
        key TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        etag TEXT NOT NULL,
        created TEXT NOT NULL,
        updated TEXT NOT NULL
    )"""

SCHEMA = (
    _RECORDS.format("dps_enrollments"),
    """CREATE TABLE IF NOT EXISTS dps_registrations (
        key TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        etag TEXT NOT NULL
    )""",
    _RECORDS.format("dps_groups"),
    # Registration states by enrollment group (POST /registrations/{groupId}/query).
    f"CREATE INDEX IF NOT EXISTS dps_registrations_by_group ON dps_registrations ({GROUP_OF_STATE}, key)",
)

BULK_MODES = ("create", "update", "updateIfMatchETag", "delete")
MAX_BULK = 10
MAX_PAGE = 1000


@dataclass(frozen=True)
class Kind:
    """Individual enrollments or enrollment groups: the same REST shapes over their own table."""

    table: str
    id_field: str
    noun: str
    items: str  # the bulk request's list
    normalise: Callable[..., dict[str, Any]]


ENROLLMENTS = Kind(
    "dps_enrollments", "registrationId", "Enrollment", "enrollments", model.normalise_enrollment
)
GROUPS = Kind(
    "dps_groups", "enrollmentGroupId", "Enrollment group", "enrollmentGroups", model.normalise_group
)


class HubProvisioner(Protocol):
    def provision_from_dps(
        self, *, hub: str, device_id: str, thumbprint_sha1: str | None, thumbprint_sha256: str | None,
        initial_twin: Mapping[str, Any] | None, apply_initial_twin: bool,
        symmetric_keys: tuple[str, str] | None = None,
    ) -> None: ...

    def device_exists(self, hub: str, device_id: str) -> bool: ...


@dataclass(frozen=True)
class RegistrationOutcome:
    status: int
    body: dict[str, Any]


def new_etag() -> str:
    """Azure's shape: base64 of a quoted random (version 4) GUID, built without ``uuid.UUID`` objects."""
    raw = bytearray(secrets.token_bytes(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    guid = f'"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"'
    return base64.b64encode(guid.encode("ascii")).decode("ascii")


class DpsService:
    def __init__(
        self,
        db: Database,
        *,
        id_scope: str,
        hub_hosts: Sequence[str],
        registry: HubProvisioner,
        clock: Callable[[], datetime],
        webhook: CustomAllocationWebhook | None = None,
    ) -> None:
        self._db = db
        db.register_schema(*SCHEMA)
        self.id_scope = id_scope
        self.hub_hosts = tuple(hub_hosts)
        self._registry = registry
        self._clock = clock
        self.webhook = webhook or CustomAllocationWebhook()

    # ------------------------------------------------------------------------ enrollments and groups
    def _row(self, record_id: str, kind: Kind = ENROLLMENTS) -> Any:
        model.check_registration_id(record_id)  # every path: nothing is looked up by a bad id
        return self._db.query_one(
            f"SELECT * FROM {kind.table} WHERE key = ?", (model.registration_key(record_id),)  # noqa: S608
        )

    def _render(self, row: Any, kind: Kind = ENROLLMENTS) -> dict[str, Any]:
        body = model.json_object(row["body"])
        body["etag"] = row["etag"]
        body["createdDateTimeUtc"] = row["created"]
        body["lastUpdatedDateTimeUtc"] = row["updated"]
        if kind is ENROLLMENTS:
            state = self._db.query_one("SELECT body FROM dps_registrations WHERE key = ?", (row["key"],))
            if state is not None:
                body["registrationState"] = model.service_registration_state(model.json_object(state["body"]))
        return body

    def get_enrollment(self, record_id: str, kind: Kind = ENROLLMENTS) -> dict[str, Any]:
        row = self._row(record_id, kind)
        if row is None:
            raise not_found(f"{kind.noun} {record_id} not found")
        return self._render(row, kind)

    def put_enrollment(
        self, record_id: str, body: Any, if_match: str | None, kind: Kind = ENROLLMENTS
    ) -> dict[str, Any]:
        model.check_registration_id(record_id)
        with self._db.transaction():
            self._put(record_id, body, model.strip_etag(if_match), mode="put", kind=kind)
            return self.get_enrollment(record_id, kind)

    def _put(
        self, path_id: str | None, body: Any, if_match: str | None, *, mode: str, now: str | None = None,
        kind: Kind = ENROLLMENTS,
    ) -> str:
        """One enrollment (or group) write (joins the caller's transaction); returns its id.  Every check
        comes before the write: a refused item writes nothing."""
        record_id = body.get(kind.id_field) if isinstance(body, dict) else None
        if mode == "create" and path_id is None:
            return self._create(body, now, kind)
        key = path_id or (record_id if isinstance(record_id, str) else None)
        existing = self._row(key, kind) if key is not None else None
        previous = model.json_object(existing["body"]) if existing is not None else None
        stored = kind.normalise(body, path_id=path_id, linked_hubs=self.hub_hosts, previous=previous)
        record_id = model.check_registration_id(stored[kind.id_field])
        if stored.get("initialTwin") is not None:
            model.check_initial_twin(stored["initialTwin"])
        now = now or azure_time(self._clock())
        if existing is None:
            if mode == "updateIfMatchETag" and if_match not in (None, "*"):
                raise precondition_failed(f"{kind.noun} {record_id} does not exist")
            self._db.connection.execute(
                f"INSERT INTO {kind.table} (key, body, etag, created, updated) VALUES (?, ?, ?, ?, ?)",  # noqa: S608
                (model.registration_key(record_id), json.dumps(stored), new_etag(), now, now),
            )
            return record_id
        if mode == "create" or (mode == "put" and if_match is None):
            raise conflict(f"{kind.noun} {record_id} already exists")
        if if_match not in (None, "*") and if_match != existing["etag"]:
            raise precondition_failed(f"ETag mismatch for {kind.noun.lower()} {record_id}")
        stored[kind.id_field] = previous[kind.id_field] if previous else record_id
        self._db.connection.execute(
            f"UPDATE {kind.table} SET body = ?, etag = ?, updated = ? WHERE key = ?",  # noqa: S608
            (json.dumps(stored), new_etag(), now, existing["key"]),
        )
        return record_id

    def _create(self, body: Any, now: str | None, kind: Kind) -> str:
        """Bulk ``create``: the same checks and answers as ``_put``, without reading the row first -- the
        primary key refuses a second record of the id (case-insensitive key) and that is the 409."""
        try:
            stored = kind.normalise(body, path_id=None, linked_hubs=self.hub_hosts)
        except DpsError:
            # Validated against the existing record (a certificate given by its info only), as _put does.
            record_id = body.get(kind.id_field) if isinstance(body, dict) else None
            existing = self._row(record_id, kind) if isinstance(record_id, str) else None
            if existing is None:
                raise
            kind.normalise(
                body, path_id=None, linked_hubs=self.hub_hosts, previous=model.json_object(existing["body"])
            )
            raise conflict(f"{kind.noun} {record_id} already exists") from None
        record_id = model.check_registration_id(stored[kind.id_field])
        if stored.get("initialTwin") is not None:
            model.check_initial_twin(stored["initialTwin"])
        now = now or azure_time(self._clock())
        try:
            self._db.connection.execute(
                f"INSERT INTO {kind.table} (key, body, etag, created, updated) VALUES (?, ?, ?, ?, ?)",  # noqa: S608
                (model.registration_key(record_id), json.dumps(stored), new_etag(), now, now),
            )
        except sqlite3.IntegrityError:
            raise conflict(f"{kind.noun} {record_id} already exists") from None
        return record_id

    def delete_enrollment(self, record_id: str, if_match: str | None, kind: Kind = ENROLLMENTS) -> None:
        with self._db.transaction():
            self._delete(record_id, model.strip_etag(if_match), kind)

    def _delete(self, record_id: str, if_match: str | None, kind: Kind = ENROLLMENTS) -> None:
        """Deleting an individual enrollment deletes its registration state with it (Azure keeps a device's
        registration record inside its individual enrollment); a group's devices keep theirs."""
        row = self._row(record_id, kind)
        if row is None:
            raise not_found(f"{kind.noun} {record_id} not found")
        if if_match not in (None, "*") and if_match != row["etag"]:
            raise precondition_failed(f"ETag mismatch for {kind.noun.lower()} {record_id}")
        self._db.connection.execute(f"DELETE FROM {kind.table} WHERE key = ?", (row["key"],))  # noqa: S608
        if kind is ENROLLMENTS:
            self._db.connection.execute("DELETE FROM dps_registrations WHERE key = ?", (row["key"],))

    def attestation_mechanism(self, record_id: str, kind: Kind = ENROLLMENTS) -> dict[str, Any]:
        return model.json_object(self.get_enrollment(record_id, kind)["attestation"])

    def bulk(self, body: Any, kind: Kind = ENROLLMENTS) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise bad_request("bulk operation must be a JSON object")
        mode = body.get("mode")
        if mode not in BULK_MODES:
            raise bad_request(f"mode must be one of {', '.join(BULK_MODES)}")
        items = body.get(kind.items)
        if not isinstance(items, list) or not items:
            raise bad_request(f"{kind.items} must be a non-empty list")
        if len(items) > MAX_BULK:
            raise DpsError(400, 400013, f"at most {MAX_BULK} {kind.items} per bulk operation")
        errors: list[dict[str, Any]] = []
        now = azure_time(self._clock())
        # One transaction (one commit) for the whole request; each item in its own savepoint, so a refused
        # item leaves nothing behind and never undoes the others.
        with self._db.transaction() as conn:
            for item in items:
                record_id = item.get(kind.id_field) if isinstance(item, dict) else None
                conn.execute("SAVEPOINT bulk_item")
                try:
                    if not isinstance(item, dict):
                        raise bad_request(f"{kind.noun.lower()} must be a JSON object")
                    etag = model.strip_etag(item.get("etag")) if isinstance(item.get("etag"), str) else None
                    if mode == "delete":
                        self._delete(model.check_registration_id(record_id), etag, kind)
                    elif mode == "create":
                        self._put(None, item, None, mode="create", now=now, kind=kind)
                    elif mode == "update":
                        self._put(None, item, "*", mode="update", now=now, kind=kind)
                    else:
                        self._put(None, item, etag or "", mode="updateIfMatchETag", now=now, kind=kind)
                except DpsError as exc:
                    conn.execute("ROLLBACK TO bulk_item")
                    errors.append(
                        {
                            kind.id_field: record_id if isinstance(record_id, str) else None,
                            "errorCode": exc.code,
                            "errorStatus": exc.message,
                        }
                    )
                conn.execute("RELEASE bulk_item")
        return {"isSuccessful": not errors, "errors": errors}

    def query(
        self, body: Any, page_size: int, continuation: str | None, kind: Kind = ENROLLMENTS
    ) -> tuple[list[dict[str, Any]], str | None]:
        if not isinstance(body, dict) or not isinstance(body.get("query"), str) or not body["query"].strip():
            raise bad_request('query specification must be {"query": "..."}')
        after, size = _page(page_size, continuation)
        rows = self._db.query(
            f"SELECT * FROM {kind.table} WHERE key > ? ORDER BY key LIMIT ?", (after, size + 1)  # noqa: S608
        )
        return [self._render(r, kind) for r in rows[:size]], _next_token(rows, size)

    def groups(self) -> list[dict[str, Any]]:
        """Every enrollment group as stored (Azure allows a few hundred per DPS)."""
        rows = self._db.query("SELECT body FROM dps_groups ORDER BY key")
        return [model.json_object(r["body"]) for r in rows]

    # ---------------------------------------------------------------------------- registration states
    def get_registration(self, registration_id: str) -> dict[str, Any]:
        model.check_registration_id(registration_id)
        row = self._db.query_one(
            "SELECT body FROM dps_registrations WHERE key = ?", (model.registration_key(registration_id),)
        )
        if row is None:
            raise DpsError(404, 404202, f"Registration {registration_id} not found")
        return model.service_registration_state(model.json_object(row["body"]))

    def delete_registration(self, registration_id: str, if_match: str | None) -> None:
        key = model.registration_key(model.check_registration_id(registration_id))
        with self._db.transaction() as conn:
            row = self._db.query_one("SELECT etag FROM dps_registrations WHERE key = ?", (key,))
            if row is None:
                raise DpsError(404, 404202, f"Registration {registration_id} not found")
            tag = model.strip_etag(if_match)
            if tag not in (None, "*") and tag != row["etag"]:
                raise precondition_failed(f"ETag mismatch for registration {registration_id}")
            conn.execute("DELETE FROM dps_registrations WHERE key = ?", (key,))

    def query_registrations(
        self, group_id: str, page_size: int, continuation: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The registration states of the devices that registered under enrollment group ``group_id``."""
        key = model.registration_key(model.check_registration_id(group_id))
        after, size = _page(page_size, continuation)
        rows = self._db.query(
            f"SELECT key, body FROM dps_registrations WHERE {GROUP_OF_STATE} = ? AND key > ?"  # noqa: S608
            " ORDER BY key LIMIT ?",
            (key, after, size + 1),
        )
        states = [model.service_registration_state(model.json_object(r["body"])) for r in rows[:size]]
        return states, _next_token(rows, size)

    # ------------------------------------------------------------------------------ device registration
    async def register_x509(
        self, registration_id: str, leaf: x509.Certificate | None, operation_id: str, payload: Any = None
    ) -> RegistrationOutcome:
        return await self.register(registration_id, DeviceCredentials(leaf=leaf), operation_id, payload)

    async def register(
        self, registration_id: str, credentials: DeviceCredentials, operation_id: str, payload: Any = None
    ) -> RegistrationOutcome:
        """The device's register request (``payload``: the one in its body, for a custom allocation
        webhook).  Errors are raised as :class:`DpsError` (sent as ``res/{status}``); the outcome is
        ``assigned``, ``disabled`` or ``failed`` (sent as 200)."""
        row = self._row(registration_id)
        now = self._clock()
        match = attestation.resolve(
            registration_id,
            credentials,
            id_scope=self.id_scope,
            individual=model.json_object(row["body"]) if row is not None else None,
            groups=self.groups() if row is None else (),
            now=now,
        )
        key = model.registration_key(registration_id)
        previous = self._db.query_one("SELECT body FROM dps_registrations WHERE key = ?", (key,))
        prev_state = model.json_object(previous["body"]) if previous else None
        created = prev_state["createdDateTimeUtc"] if prev_state else azure_time(now)
        reg_id = match.record["registrationId"] if match.kind == "individual" else registration_id
        base = {
            **match.result,
            "registrationId": reg_id,
            "createdDateTimeUtc": created,
            "lastUpdatedDateTimeUtc": azure_time(now),
        }
        if not match.enabled:
            state = {**base, "status": "disabled", "etag": new_etag()}
            with self._db.transaction() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO dps_registrations (key, body, etag) VALUES (?, ?, ?)",
                    (key, json.dumps(state), state["etag"]),
                )
            return RegistrationOutcome(200, {"operationId": operation_id, "status": "disabled",
                                             "registrationState": state})
        device_id = match.record.get("deviceId") or reg_id
        try:
            allocation = await self._choose_hub(match, reg_id, payload, prev_state)
        except AllocationFailed as exc:
            failed = {**base, "status": "failed", "errorCode": exc.code, "errorMessage": exc.message}
            return RegistrationOutcome(
                200, {"operationId": operation_id, "status": "failed", "registrationState": failed}
            )
        hub, substatus, apply_twin = self._reprovision(match.record, reg_id, prev_state, allocation)
        sha1 = sha256 = None
        if match.symmetric_keys is None and credentials.leaf is not None:
            sha1, sha256 = thumbprints(credentials.leaf)
        state = {
            **base,
            "assignedHub": hub,
            "deviceId": device_id,
            "status": "assigned",
            "substatus": substatus,
            "etag": new_etag(),
        }
        if allocation.payload is not None:
            state["payload"] = allocation.payload
        initial_twin = allocation.initial_twin
        if initial_twin is None:
            initial_twin = match.record.get("initialTwin")
        try:
            with self._db.transaction() as conn:
                self._registry.provision_from_dps(
                    hub=hub,
                    device_id=device_id,
                    thumbprint_sha1=sha1,
                    thumbprint_sha256=sha256,
                    initial_twin=initial_twin,
                    apply_initial_twin=apply_twin,
                    symmetric_keys=match.symmetric_keys,
                )
                conn.execute(
                    "INSERT OR REPLACE INTO dps_registrations (key, body, etag) VALUES (?, ?, ?)",
                    (key, json.dumps(state), state["etag"]),
                )
        except (twinmodel.TwinError, RegistryError) as exc:
            # The hub refused the identity or twin: nothing was written (one transaction).
            failed = {**base, "status": "failed", "errorCode": 400209, "errorMessage": str(exc)}
            return RegistrationOutcome(
                200, {"operationId": operation_id, "status": "failed", "registrationState": failed}
            )
        return RegistrationOutcome(200, {"operationId": operation_id, "status": "assigned",
                                         "registrationState": state})

    async def _choose_hub(
        self, match: Match, registration_id: str, payload: Any, prev: Mapping[str, Any] | None
    ) -> Allocation:
        """The hub the allocation policy of the device's individual enrollment or group (``match``)
        chooses; for ``custom``, the webhook's answer, asked with that enrollment or group as the service
        API shows it."""
        enrollment = match.record
        prev_hub = _assigned_hub(prev)
        if enrollment.get("allocationPolicy") != "custom":
            candidates = model.candidate_hubs(enrollment, self.hub_hosts)
            policy = enrollment.get("allocationPolicy")
            return Allocation(builtin_hub(policy, registration_id, candidates, self.hub_hosts))
        hubs = linked_hubs(enrollment, self.hub_hosts, prev_hub)
        if match.kind == "group":
            kind, row = GROUP, self._row(str(enrollment["enrollmentGroupId"]), GROUPS)
        else:
            kind, row = INDIVIDUAL, self._row(registration_id)
        request = allocation_request(
            kind=kind,
            enrollment=self._render(row, GROUPS if match.kind == "group" else ENROLLMENTS),
            registration_id=registration_id,
            attestation=match.result,
            payload=payload,
            current_hub=prev_hub,
            current_device_id=(prev or {}).get("deviceId") if prev_hub else None,
            hubs=hubs,
        )
        return await self.webhook.allocate(enrollment["customAllocationDefinition"], request, hubs)

    def _reprovision(
        self,
        enrollment: Mapping[str, Any],
        registration_id: str,
        prev: Mapping[str, Any] | None,
        allocation: Allocation,
    ) -> tuple[str, str, bool]:
        """(hub, substatus, apply initial twin): the allocation, under the enrollment's reprovision policy
        when the device was assigned before."""
        chosen = allocation.hub
        prev_hub = _assigned_hub(prev)
        if prev is None or prev_hub is None:
            return chosen, "initialAssignment", True
        device_id = enrollment.get("deviceId") or registration_id
        policy = enrollment.get("reprovisionPolicy") or {}
        # Built-in policies keep a device on any of the enrollment's hubs; a custom webhook decides anew.
        if enrollment.get("allocationPolicy") == "custom":
            stays = prev_hub == chosen
        else:
            stays = prev_hub in model.candidate_hubs(enrollment, self.hub_hosts)
        if stays or not policy.get("updateHubAssignment", True):
            # Same assignment; a device deleted on its hub is re-created with the initial twin.
            present = self._registry.device_exists(prev_hub, device_id)
            return prev_hub, prev.get("substatus") or "initialAssignment", not present
        if policy.get("migrateDeviceData", True):
            return chosen, "deviceDataMigrated", True
        return chosen, "deviceDataReset", True


def _assigned_hub(prev: Mapping[str, Any] | None) -> str | None:
    hub = prev.get("assignedHub") if prev and prev.get("status") == "assigned" else None
    return hub if isinstance(hub, str) else None


def _page(page_size: int, continuation: str | None) -> tuple[str, int]:
    """(the key after which a page starts, its size) from ``x-ms-max-item-count``/``x-ms-continuation``."""
    after = ""
    if continuation:
        try:
            after = base64.urlsafe_b64decode(continuation.encode("ascii")).decode("utf-8")
        except (ValueError, UnicodeError) as exc:
            raise bad_request("invalid continuation token") from exc
    return after, max(1, min(page_size, MAX_PAGE))


def _next_token(rows: Sequence[Any], size: int) -> str | None:
    if len(rows) <= size:
        return None
    return base64.urlsafe_b64encode(rows[size - 1]["key"].encode("utf-8")).decode("ascii")


def operation_id() -> str:
    return f"4.{secrets.token_hex(8)}.{uuid.uuid4()}"
