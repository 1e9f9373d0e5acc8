"""A lot after minting: its enrollment (``lot --enroll``, ``enroll-batch --lot``) and where each of its
devices stands (``lot-status``), both from and into the lot's manifest (``factory_svc.lots.manifest``).

Enrolling a lot sends the devices its manifest lists as minted and not enrolled (all minted ones with
``--replace``) through EnrollBatch (``factory_svc.enrollment.batch_client``); the codes go to the lot's
``codes.csv`` before they are acknowledged, and the manifest records each answer.  A crash at any point is
resumed by running the command again: devices the codes file shows answered are recorded from it
(``LotManifest.reconcile``), those answered but not yet on disk come back UNCHANGED with their retained codes,
and nothing is enrolled twice.

``lot-status`` columns (``--json``: the same facts, by key):

  minted       the certificate was issued and its files are in the lot directory (``failed``: the factory
               refused the item; the manifest keeps why)
  enrolled     the enrollment's outcome at the factory (CREATED, UNCHANGED, QUEUED...; ``failed``: refused)
  code         ``printed``: a label with the device's current code was printed; ``stale``: printed, but
               the code was rotated since; ``no``: not printed yet; ``missing``: no code in codes.csv
               (``enroll-batch --lot DIR --rotate-missing`` makes one)
  activated    the DPS enrollment is enabled (the OEM activated the device); asked of the factory
  registered   the DPS registration: the hub it was assigned to and when DPS last updated it
  last seen    the device's last activity on that hub (the hub registry's lastActivityTime: its last telemetry
               or other message), when the factory holds that hub's credentials; else ``-``

``lot-status`` prints the manifest's facts in any case, then exits 0 when the factory answered for every
enrolled device (or was not asked: ``--no-cloud``); 1 when it answered for some (``?`` in the others' rows,
how many and why on standard error); and when it answered for none, as any command whose service fails:
3 when it is unreachable (saying why: nothing listens, TLS ...), 1 when it refused (the reason).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from factory_svc.enrollment.batch_client import (
    BatchItem,
    BatchOptions,
    BatchTally,
    enroll_in_chunks,
    report_open,
    rotate_missing,
)
from factory_svc.enrollment.codes_file import CodesFile, Row, read_codes
from factory_svc.lots.manifest import (
    DeviceEntry,
    DeviceState,
    Enrolled,
    LotManifest,
    code_digest,
    load,
    locked,
    now_text,
)
from mainkit.shell import print_json
from provkit.channels import EXIT_REFUSED
from provkit.errors import InputError
from provkit.proto_names import enum_label

STATUS_CONCURRENCY = 8  # GetEnrollmentStatus calls in flight for lot-status


async def enroll_lot(
    stub: pb_grpc.FactoryServiceStub,
    directory: Path,
    options: BatchOptions,
    rotate: bool,
    codes_out: Path | None = None,
) -> int:
    """``enroll-batch --lot DIR``: enroll what the lot minted (the lot's lock held throughout)."""
    if codes_out is not None:
        raise InputError(f"with --lot the codes go to the lot's own codes file ({directory / 'codes.csv'})")
    with locked(directory):
        return await enroll_manifest(stub, load(directory), options, rotate)


async def enroll_manifest(
    stub: pb_grpc.FactoryServiceStub, manifest: LotManifest, options: BatchOptions, rotate: bool
) -> int:
    """Enroll the manifest's minted devices not enrolled yet; the caller holds the lot's lock."""
    codes = CodesFile.open(manifest.codes_path)
    try:
        if manifest.reconcile(codes.answers, options.owner):
            manifest.save()
        todo = [
            entry
            for entry in manifest.in_order()
            if entry.minted
            and "chain" in entry.files
            and (options.replace or entry.state in (DeviceState.MINTED, DeviceState.ENROLL_FAILED))
        ]
        items = [BatchItem(entry.device_id, manifest.file(entry, "chain")) for entry in todo]
        tally = BatchTally.of(items)
        by_id = {entry.device_id.lower(): entry for entry in todo}

        def record(rows: list[Row]) -> None:
            for device_id, outcome, delivery, _code, error in rows:
                entry = by_id.get(device_id.lower())
                if entry is None:
                    continue
                if outcome:
                    entry.enrolled = Enrolled(now_text(), outcome, delivery, options.owner)
                    entry.error = ""
                elif entry.enrolled is None:
                    entry.error = error
            manifest.save_now_and_then()

        try:
            if items:
                await enroll_in_chunks(stub, items, codes, options, tally, record)
            tally.without_code = [
                e.device_id for e in manifest.in_order() if e.enrolled and e.device_id not in codes.codes
            ]
            if rotate:
                await rotate_missing(stub, codes, tally.without_code, options.timeout)
        finally:
            manifest.save()
            report_open(tally, f"run `factory-svc enroll-batch --lot {manifest.directory} --rotate-missing`")
    finally:
        codes.close()
    states = [entry.state for entry in manifest.devices.values()]
    enrolled = sum(state in (DeviceState.ENROLLED, DeviceState.PRINTED) for state in states)
    failed = states.count(DeviceState.ENROLL_FAILED)
    print(
        f"lot {manifest.lot_id}: {enrolled} of {manifest.item_count} enrolled ({tally.done} sent now), "
        f"{failed} refused; codes: {manifest.codes_path} (0600), manifest: {manifest.path}"
    )
    return 1 if failed or tally.without_code else 0


# -------------------------------------------------------------------------------------------- lot-status
@dataclass
class DeviceStatus:
    """One row of ``lot-status``: the manifest's facts, and the factory's answer about the cloud."""

    entry: DeviceEntry
    code: str  # printed | stale | no | missing | "" (not enrolled)
    cloud: dict[str, Any] = field(default_factory=dict)  # empty: not asked (not enrolled) or unreachable
    cloud_error: str = ""
    failure: grpc.aio.AioRpcError | None = field(default=None, repr=False)  # the call behind cloud_error

    def to_json(self) -> dict[str, Any]:
        entry = self.entry
        return {
            "index": entry.index,
            "device_id": entry.device_id,
            "serial": entry.serial,
            "state": entry.state.value,
            "minted": entry.minted or None,
            "enrolled": None if entry.enrolled is None else vars(entry.enrolled),
            "code": self.code or None,
            "label_printed": None if entry.label is None else entry.label.at,
            "error": entry.error or None,
            **self.cloud,
            "cloud_error": self.cloud_error or None,
        }


def _when(message: Any, name: str) -> str | None:
    if not message.HasField(name):
        return None
    moment: datetime = getattr(message, name).ToDatetime()
    return moment.isoformat(timespec="seconds") + "Z"


def _cloud(reply: pb.GetEnrollmentStatusResponse) -> dict[str, Any]:
    return {
        "enrollment_state": enum_label(pb.EnrollmentState, reply.state, "ENROLLMENT_STATE_"),
        "activated": reply.provisioning_status == "enabled" if reply.provisioning_status else None,
        "owner": reply.owner_oem or None,
        "registration": {
            "status": reply.registration_status or None,
            "hub": reply.assigned_hub or None,
            "updated": _when(reply, "registration_updated_time"),
        },
        "last_activity": _when(reply, "last_activity_time"),
        "connection_state": reply.hub_connection_state or None,
    }


def code_column(entry: DeviceEntry, codes: dict[str, str]) -> str:
    if entry.enrolled is None:
        return ""
    code = codes.get(entry.device_id)
    if code is None:
        return "missing"
    if entry.label is None:
        return "no"
    return "printed" if entry.label.code_digest == code_digest(code) else "stale"


async def device_statuses(
    stub: pb_grpc.FactoryServiceStub, manifest: LotManifest, call_timeout: float, ask_cloud: bool = True
) -> list[DeviceStatus]:
    codes = read_codes(manifest.codes_path) if manifest.codes_path.exists() else {}
    rows = [DeviceStatus(entry, code_column(entry, codes)) for entry in manifest.in_order()]
    if not ask_cloud:
        return rows
    gate = asyncio.Semaphore(STATUS_CONCURRENCY)

    async def ask(row: DeviceStatus) -> None:
        async with gate:
            try:
                reply = await stub.GetEnrollmentStatus(
                    pb.GetEnrollmentStatusRequest(device_id=row.entry.device_id), timeout=call_timeout
                )
            except grpc.aio.AioRpcError as exc:
                row.cloud_error = f"{exc.code().name}: {exc.details()}"
                row.failure = exc
                return
            row.cloud = _cloud(reply)

    await asyncio.gather(*(ask(row) for row in rows if row.entry.enrolled is not None))
    return rows


def _table(rows: Sequence[DeviceStatus]) -> list[str]:
    header = ("DEVICE", "MINTED", "ENROLLED", "CODE", "ACTIVATED", "REGISTERED", "LAST SEEN")
    lines = [header]
    for row in rows:
        entry, cloud = row.entry, row.cloud
        registration = cloud.get("registration") or {}
        registered = (
            f"{registration['hub']} {registration['updated'] or ''}".strip()
            if registration.get("status") == "assigned"
            else registration.get("status") or "-"
        )
        activated = {True: "yes", False: "no", None: "?"}[cloud.get("activated")] if cloud else "-"
        if row.cloud_error:
            activated = registered = "?"
        lines.append(
            (
                entry.device_id,
                "yes" if entry.minted else "failed",
                entry.enrolled.outcome if entry.enrolled else ("failed" if entry.error else "-"),
                row.code or "-",
                activated,
                registered,
                cloud.get("last_activity") or "-",
            )
        )
    widths = [max(len(line[n]) for line in lines) for n in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]


def _counts(rows: Sequence[DeviceStatus]) -> dict[str, int]:
    return {
        "devices": len(rows),
        "minted": sum(bool(r.entry.minted) for r in rows),
        "enrolled": sum(r.entry.enrolled is not None for r in rows),
        "code_printed": sum(r.code == "printed" for r in rows),
        "activated": sum(r.cloud.get("activated") is True for r in rows),
        "registered": sum((r.cloud.get("registration") or {}).get("status") == "assigned" for r in rows),
        "seen": sum(bool(r.cloud.get("last_activity")) for r in rows),
    }


async def lot_status(
    stub: pb_grpc.FactoryServiceStub, directory: Path, as_json: bool, call_timeout: float, ask_cloud: bool
) -> int:
    manifest = load(directory)
    rows = await device_statuses(stub, manifest, call_timeout, ask_cloud)
    counts = _counts(rows)
    if as_json:
        document = {
            "lot_id": manifest.lot_id,
            "item_count": manifest.item_count,
            "counts": counts,
            "devices": [row.to_json() for row in rows],
        }
        print_json(document)
    else:
        print(
            f"lot {manifest.lot_id}: {counts['minted']}/{manifest.item_count} minted, {counts['enrolled']} "
            f"enrolled, {counts['code_printed']} code printed, {counts['activated']} activated, "
            f"{counts['registered']} registered, {counts['seen']} seen on a hub"
        )
        print("\n".join(_table(rows)))
    asked = [row for row in rows if row.entry.enrolled is not None] if ask_cloud else []
    failures = [row.failure for row in asked if row.failure is not None]
    if failures and len(failures) == len(asked):
        raise failures[0]  # answered for none: the shell says why (unreachable: exit 3)
    if failures:  # on standard error: what --json prints stays one JSON document
        print(
            f"the factory could not say where {len(failures)} of {len(asked)} device(s) stand: "
            f"{failures[0].code().name}: {failures[0].details()}",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    return 0
