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

from azure_iot_emulator.dps import model
from azure_iot_emulator.dps.allocation import (
    INDIVIDUAL,
    Allocation,
    AllocationFailed,
    CustomAllocationWebhook,
    allocation_request,
    builtin_hub,
    linked_hubs,
)
from azure_iot_emulator.dps.certinfo import certificate_info, common_name, thumbprints
from azure_iot_emulator.dps.errors import (
    DpsError,
    azure_time,
    bad_request,
    conflict,
    not_found,
    precondition_failed,
    unauthorized,
)
from azure_iot_emulator.hub import twin as twinmodel
from azure_iot_emulator.hub.registry import RegistryError
from azure_iot_emulator.store import Database

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS dps_enrollments (
        key TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        etag TEXT NOT NULL,
        created TEXT NOT NULL,
        updated TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS dps_registrations (
        key TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        etag TEXT NOT NULL
    )""",
)

BULK_MODES = ("create", "update", "updateIfMatchETag", "delete")
MAX_BULK = 10
MAX_PAGE = 1000


class HubProvisioner(Protocol):
    def provision_from_dps(
        self, *, hub: str, device_id: str, thumbprint_sha1: str, thumbprint_sha256: str,
        initial_twin: Mapping[str, Any] | None, apply_initial_twin: bool,
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

    # ------------------------------------------------------------------------------------- enrollments
    def _row(self, registration_id: str) -> Any:
        model.check_registration_id(registration_id)  # every path: nothing is looked up by a bad id
        return self._db.query_one(
            "SELECT * FROM dps_enrollments WHERE key = ?", (model.registration_key(registration_id),)
        )

    def _render(self, row: Any) -> dict[str, Any]:
        body = model.json_object(row["body"])
        body["etag"] = row["etag"]
        body["createdDateTimeUtc"] = row["created"]
        body["lastUpdatedDateTimeUtc"] = row["updated"]
        state = self._db.query_one("SELECT body FROM dps_registrations WHERE key = ?", (row["key"],))
        if state is not None:
            body["registrationState"] = model.json_object(state["body"])
        return body

    def get_enrollment(self, registration_id: str) -> dict[str, Any]:
        row = self._row(registration_id)
        if row is None:
            raise not_found(f"Enrollment {registration_id} not found")
        return self._render(row)

    def put_enrollment(self, registration_id: str, body: Any, if_match: str | None) -> dict[str, Any]:
        model.check_registration_id(registration_id)
        with self._db.transaction():
            self._put(registration_id, body, model.strip_etag(if_match), mode="put")
            return self.get_enrollment(registration_id)

    def _put(
        self, path_id: str | None, body: Any, if_match: str | None, *, mode: str, now: str | None = None
    ) -> str:
        """One enrollment write (joins the caller's transaction); returns the registration id.  Every
        check comes before the write: a refused item writes nothing."""
        reg_id = body.get("registrationId") if isinstance(body, dict) else None
        if mode == "create" and path_id is None:
            return self._create(body, now)
        key = path_id or (reg_id if isinstance(reg_id, str) else None)
        existing = self._row(key) if key is not None else None
        previous = model.json_object(existing["body"]) if existing is not None else None
        stored = model.normalise_enrollment(
            body, path_id=path_id, linked_hubs=self.hub_hosts, previous=previous
        )
        reg_id = model.check_registration_id(stored["registrationId"])
        if stored.get("initialTwin") is not None:
            model.check_initial_twin(stored["initialTwin"])
        now = now or azure_time(self._clock())
        if existing is None:
            if mode == "updateIfMatchETag" and if_match not in (None, "*"):
                raise precondition_failed(f"Enrollment {reg_id} does not exist")
            self._db.connection.execute(
                "INSERT INTO dps_enrollments (key, body, etag, created, updated) VALUES (?, ?, ?, ?, ?)",
                (model.registration_key(reg_id), json.dumps(stored), new_etag(), now, now),
            )
            return reg_id
        if mode == "create" or (mode == "put" and if_match is None):
            raise conflict(f"Enrollment {reg_id} already exists")
        if if_match not in (None, "*") and if_match != existing["etag"]:
            raise precondition_failed(f"ETag mismatch for enrollment {reg_id}")
        stored["registrationId"] = previous["registrationId"] if previous else reg_id
        self._db.connection.execute(
            "UPDATE dps_enrollments SET body = ?, etag = ?, updated = ? WHERE key = ?",
            (json.dumps(stored), new_etag(), now, existing["key"]),
        )
        return reg_id

    def _create(self, body: Any, now: str | None) -> str:
        """Bulk ``create``: the same checks and answers as ``_put``, without reading the row first -- the
        primary key refuses a second enrollment of the id (case-insensitive key) and that is the 409."""
        try:
            stored = model.normalise_enrollment(body, path_id=None, linked_hubs=self.hub_hosts)
        except DpsError:
            # Validated against the existing enrollment (a certificate given by its info only), as _put does.
            reg_id = body.get("registrationId") if isinstance(body, dict) else None
            existing = self._row(reg_id) if isinstance(reg_id, str) else None
            if existing is None:
                raise
            model.normalise_enrollment(
                body, path_id=None, linked_hubs=self.hub_hosts, previous=model.json_object(existing["body"])
            )
            raise conflict(f"Enrollment {reg_id} already exists") from None
        reg_id = model.check_registration_id(stored["registrationId"])
        if stored.get("initialTwin") is not None:
            model.check_initial_twin(stored["initialTwin"])
        now = now or azure_time(self._clock())
        try:
            self._db.connection.execute(
                "INSERT INTO dps_enrollments (key, body, etag, created, updated) VALUES (?, ?, ?, ?, ?)",
                (model.registration_key(reg_id), json.dumps(stored), new_etag(), now, now),
            )
        except sqlite3.IntegrityError:
            raise conflict(f"Enrollment {reg_id} already exists") from None
        return reg_id

    def delete_enrollment(self, registration_id: str, if_match: str | None) -> None:
        with self._db.transaction():
            self._delete(registration_id, model.strip_etag(if_match))

    def _delete(self, registration_id: str, if_match: str | None) -> None:
        row = self._row(registration_id)
        if row is None:
            raise not_found(f"Enrollment {registration_id} not found")
        if if_match not in (None, "*") and if_match != row["etag"]:
            raise precondition_failed(f"ETag mismatch for enrollment {registration_id}")
        self._db.connection.execute("DELETE FROM dps_enrollments WHERE key = ?", (row["key"],))

    def attestation_mechanism(self, registration_id: str) -> dict[str, Any]:
        return model.json_object(self.get_enrollment(registration_id)["attestation"])

    def bulk(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise bad_request("bulk operation must be a JSON object")
        mode = body.get("mode")
        if mode not in BULK_MODES:
            raise bad_request(f"mode must be one of {', '.join(BULK_MODES)}")
        items = body.get("enrollments")
        if not isinstance(items, list) or not items:
            raise bad_request("enrollments must be a non-empty list")
        if len(items) > MAX_BULK:
            raise DpsError(400, 400013, f"at most {MAX_BULK} enrollments per bulk operation")
        errors: list[dict[str, Any]] = []
        now = azure_time(self._clock())
        # One transaction (one commit) for the whole request; each item in its own savepoint, so a refused
        # item leaves nothing behind and never undoes the others.
        with self._db.transaction() as conn:
            for item in items:
                reg_id = item.get("registrationId") if isinstance(item, dict) else None
                conn.execute("SAVEPOINT bulk_item")
                try:
                    if not isinstance(item, dict):
                        raise bad_request("enrollment must be a JSON object")
                    etag = model.strip_etag(item.get("etag")) if isinstance(item.get("etag"), str) else None
                    if mode == "delete":
                        self._delete(model.check_registration_id(reg_id), etag)
                    elif mode == "create":
                        self._put(None, item, None, mode="create", now=now)
                    elif mode == "update":
                        self._put(None, item, "*", mode="update", now=now)
                    else:
                        self._put(None, item, etag or "", mode="updateIfMatchETag", now=now)
                except DpsError as exc:
                    conn.execute("ROLLBACK TO bulk_item")
                    errors.append(
                        {
                            "registrationId": reg_id if isinstance(reg_id, str) else None,
                            "errorCode": exc.code,
                            "errorStatus": exc.message,
                        }
                    )
                conn.execute("RELEASE bulk_item")
        return {"isSuccessful": not errors, "errors": errors}

    def query(
        self, body: Any, page_size: int, continuation: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        if not isinstance(body, dict) or not isinstance(body.get("query"), str) or not body["query"].strip():
            raise bad_request('query specification must be {"query": "..."}')
        after = ""
        if continuation:
            try:
                after = base64.urlsafe_b64decode(continuation.encode("ascii")).decode("utf-8")
            except (ValueError, UnicodeError) as exc:
                raise bad_request("invalid continuation token") from exc
        size = max(1, min(page_size, MAX_PAGE))
        rows = self._db.query(
            "SELECT * FROM dps_enrollments WHERE key > ? ORDER BY key LIMIT ?", (after, size + 1)
        )
        items = [self._render(r) for r in rows[:size]]
        token = None
        if len(rows) > size:
            token = base64.urlsafe_b64encode(rows[size - 1]["key"].encode("utf-8")).decode("ascii")
        return items, token

    # ---------------------------------------------------------------------------- registration states
    def get_registration(self, registration_id: str) -> dict[str, Any]:
        model.check_registration_id(registration_id)
        row = self._db.query_one(
            "SELECT body FROM dps_registrations WHERE key = ?", (model.registration_key(registration_id),)
        )
        if row is None:
            raise DpsError(404, 404202, f"Registration {registration_id} not found")
        return model.json_object(row["body"])

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

    # ------------------------------------------------------------------------------ device registration
    async def register_x509(
        self, registration_id: str, leaf: x509.Certificate | None, operation_id: str, payload: Any = None
    ) -> RegistrationOutcome:
        """The device's register request (``payload``: the one in its body, for a custom allocation
        webhook).  Errors are raised as :class:`DpsError` (sent as ``res/{status}``); the outcome is
        ``assigned``, ``disabled`` or ``failed`` (sent as 200)."""
        row = self._row(registration_id)
        if row is None:
            raise DpsError(404, 404201, f"No enrollment for registration id {registration_id}")
        enrollment = model.json_object(row["body"])
        self._check_attestation(enrollment, registration_id, leaf)
        assert leaf is not None
        now = self._clock()
        key = row["key"]
        previous = self._db.query_one("SELECT body FROM dps_registrations WHERE key = ?", (key,))
        prev_state = model.json_object(previous["body"]) if previous else None
        created = prev_state["createdDateTimeUtc"] if prev_state else azure_time(now)
        cert_info = certificate_info(leaf)
        base = {
            "x509": {"certificateInfo": cert_info},
            "registrationId": enrollment["registrationId"],
            "createdDateTimeUtc": created,
            "lastUpdatedDateTimeUtc": azure_time(now),
        }
        if enrollment["provisioningStatus"] != "enabled":
            state = {**base, "status": "disabled", "etag": new_etag()}
            with self._db.transaction() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO dps_registrations (key, body, etag) VALUES (?, ?, ?)",
                    (key, json.dumps(state), state["etag"]),
                )
            return RegistrationOutcome(200, {"operationId": operation_id, "status": "disabled",
                                             "registrationState": state})
        device_id = enrollment.get("deviceId") or enrollment["registrationId"]
        try:
            # Group enrollments plug in here: kind GROUP with the group's service-API JSON.
            allocation = await self._choose_hub(
                INDIVIDUAL, self._render(row), enrollment, registration_id,
                {"x509": {"certificateInfo": cert_info}}, payload, prev_state,
            )
        except AllocationFailed as exc:
            failed = {**base, "status": "failed", "errorCode": exc.code, "errorMessage": exc.message}
            return RegistrationOutcome(
                200, {"operationId": operation_id, "status": "failed", "registrationState": failed}
            )
        hub, substatus, apply_twin = self._reprovision(enrollment, prev_state, allocation)
        sha1, sha256 = thumbprints(leaf)
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
        initial_twin = allocation.initial_twin if allocation.initial_twin is not None else enrollment.get(
            "initialTwin"
        )
        try:
            with self._db.transaction() as conn:
                self._registry.provision_from_dps(
                    hub=hub,
                    device_id=device_id,
                    thumbprint_sha1=sha1,
                    thumbprint_sha256=sha256,
                    initial_twin=initial_twin,
                    apply_initial_twin=apply_twin,
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

    def _check_attestation(
        self, enrollment: Mapping[str, Any], registration_id: str, leaf: x509.Certificate | None
    ) -> None:
        attestation = enrollment["attestation"]
        if attestation.get("type") != "x509" or leaf is None:
            raise unauthorized("Invalid certificate: X.509 attestation needs a client certificate")
        cn = common_name(leaf)
        if cn is None or cn.lower() != registration_id.lower():
            raise unauthorized("Invalid certificate: subject CN does not match the registration id")
        now = self._clock()
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise unauthorized("Invalid certificate: expired or not yet valid")
        sha1, sha256 = thumbprints(leaf)
        certs = attestation["x509"]["clientCertificates"]
        for slot in ("primary", "secondary"):
            info = (certs.get(slot) or {}).get("info") or {}
            if sha1 == info.get("sha1Thumbprint") or sha256 == info.get("sha256Thumbprint"):
                return
        raise unauthorized("Invalid certificate: thumbprint does not match the enrollment")

    async def _choose_hub(
        self,
        kind: str,
        entry: Mapping[str, Any],
        enrollment: Mapping[str, Any],
        registration_id: str,
        attestation: Mapping[str, Any],
        payload: Any,
        prev: Mapping[str, Any] | None,
    ) -> Allocation:
        """The hub the enrollment's allocation policy chooses; for ``custom``, the webhook's answer
        (``kind``/``entry``: the enrollment as the AllocationRequest carries it)."""
        prev_hub = _assigned_hub(prev)
        if enrollment.get("allocationPolicy") != "custom":
            candidates = model.candidate_hubs(enrollment, self.hub_hosts)
            policy = enrollment.get("allocationPolicy")
            return Allocation(builtin_hub(policy, enrollment["registrationId"], candidates, self.hub_hosts))
        hubs = linked_hubs(enrollment, self.hub_hosts, prev_hub)
        request = allocation_request(
            kind=kind,
            enrollment=entry,
            registration_id=registration_id,
            attestation=attestation,
            payload=payload,
            current_hub=prev_hub,
            current_device_id=(prev or {}).get("deviceId") if prev_hub else None,
            hubs=hubs,
        )
        return await self.webhook.allocate(enrollment["customAllocationDefinition"], request, hubs)

    def _reprovision(
        self, enrollment: Mapping[str, Any], prev: Mapping[str, Any] | None, allocation: Allocation
    ) -> tuple[str, str, bool]:
        """(hub, substatus, apply initial twin): the allocation, under the enrollment's reprovision policy
        when the device was assigned before."""
        chosen = allocation.hub
        prev_hub = _assigned_hub(prev)
        if prev is None or prev_hub is None:
            return chosen, "initialAssignment", True
        device_id = enrollment.get("deviceId") or enrollment["registrationId"]
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


def operation_id() -> str:
    return f"4.{secrets.token_hex(8)}.{uuid.uuid4()}"
