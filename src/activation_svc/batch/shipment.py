"""A shipment CSV, read and activated row by row.

The CSV
-------
UTF-8 text (a BOM is skipped), a header row, then one row per device.  Columns (header names, any case):
``guid`` (or ``device_id``), ``code`` (or ``activation_code``), optional ``hub`` (empty: the service's
default hub, or ``default_hub``), and, when the OEM has a template, one column per template field named
by its path (``tags.chassisNumber``, ``desired.telemetryIntervalSeconds``; ``activation_svc.templates.
fields``), typed by the template like the portal's form.  Instead of template columns, one metadata JSON
(``--metadata FILE``) may apply to every row; both at once is refused.  A column the template does not
name is refused before anything is sent (a typo would otherwise drop a value silently), and so is a
column named twice, a row with more cells than the header (an unquoted comma would shift its values), CSV
that does not parse strictly (an unclosed quote), a control character (NUL, ESC, ...) anywhere, and a
metadata JSON that ``jsonsafe`` refuses or that is not one object (``check_metadata_json``).  At most
``MAX_ROWS`` rows; each row's device id is checked before anything is sent.

The request id of a row
-----------------------
``row_request_id(device_id, hub, metadata_json)`` = ``shipment-`` + the first 40 hex digits of the SHA-256
of the row's device id, hub and metadata text: the same row gives the same id in every run, so a re-run
after a crash or Ctrl-C replays what the first run did (the service answers a known id with its first
answer, ``replayed``; ``provkit.idempotency``) and only does what is left.  A row changed since (another
hub, other metadata) is another request, as it must be.  The activation code is not part of it (the id is
logged; the code never is).

Results
-------
One ``RowResult`` per row: ``activated`` (the enrollment or hub twin was written, now or by the earlier
run the answer replays), ``already active`` (nothing needed writing), ``refused`` (the service's reason,
and the field it names), or ``not sent`` (the service could not be reached; run again).  ``ResultWriter``
writes them as CSV (``line, device_id, hub, outcome, reason, field, detail, replayed, request_id``),
one row at a time and flushed, so a killed run leaves the rows it finished; never the code.  Crash point
``batch.answered``: a row's answer received, its result not written yet (a re-run replays it).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import auto
from pathlib import Path
from typing import IO, Any

import grpc

import jsonsafe
from activation_svc.templates.fields import FieldSet, metadata_from_values
from devprov.v1 import activation_service_pb2 as pb
from devprov.v1 import activation_service_pb2_grpc as pb_grpc
from provkit.channels import request_metadata
from provkit.device_id import DeviceIdPolicy, check_device_id
from provkit.errors import DomainError, InputError, ReasonEnum
from provkit.faults import crash_point
from provkit.grpc_errors import error_details

MAX_ROWS = 100_000
MAX_CELL = 4096
DEVICE_COLUMNS = ("guid", "device_id", "device id")
CODE_COLUMNS = ("code", "activation_code", "activation code")
_ALIASES = (DEVICE_COLUMNS, CODE_COLUMNS, ("hub",))
# C0 controls but tab and line ends, and DEL: no cell of a shipment holds one (NUL, ESC, ...)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
RESULT_COLUMNS = (
    "line",
    "device_id",
    "hub",
    "outcome",
    "reason",
    "field",
    "detail",
    "replayed",
    "request_id",
)

ACTIVATED = "activated"
ALREADY = "already active"
REFUSED = "refused"
NOT_SENT = "not sent"


class BatchReason(ReasonEnum):
    DUPLICATE_IN_SHIPMENT = auto(), "the device is on an earlier line of the same shipment: that row is sent"


class ShipmentError(InputError):
    """The shipment file as a whole cannot be used (nothing was sent)."""


@dataclass(frozen=True)
class ShipmentRow:
    line: int  # the CSV's line number (the header is line 1)
    device_id: str  # as checked ("" when refused before sending)
    code: str
    hub: str
    metadata_json: str
    request_id: str
    problem: RowResult | None = None  # refused before anything was sent (e.g. a malformed GUID)


@dataclass(frozen=True)
class RowResult:
    line: int
    device_id: str
    hub: str
    outcome: str  # ACTIVATED, ALREADY, REFUSED, NOT_SENT
    reason: str = ""
    field: str = ""
    detail: str = ""
    replayed: bool = False
    request_id: str = ""

    @property
    def succeeded(self) -> bool:
        return self.outcome in (ACTIVATED, ALREADY)

    def cells(self) -> list[str]:
        return [
            str(self.line),
            self.device_id,
            self.hub,
            self.outcome,
            self.reason,
            self.field,
            self.detail,
            "yes" if self.replayed else "",
            self.request_id,
        ]


def row_request_id(device_id: str, hub: str, metadata_json: str) -> str:
    digest = hashlib.sha256("\x1f".join((device_id, hub.strip().lower(), metadata_json)).encode("utf-8"))
    return "shipment-" + digest.hexdigest()[:40]


def _column(header: Sequence[str], names: Iterable[str]) -> int | None:
    wanted = set(names)
    for index, name in enumerate(header):
        if name.strip().lower() in wanted:
            return index
    return None


def _canonical(metadata: Mapping[str, Any]) -> str:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_metadata_json(text: str, what: str) -> None:
    """``ShipmentError`` unless ``text`` is one JSON object that ``jsonsafe`` takes (``what`` names it)."""
    try:
        value = jsonsafe.loads(text)
    except jsonsafe.JsonRefused as exc:
        raise ShipmentError(f"{what} is refused: {exc} [{exc.reason}]") from None
    if not isinstance(value, dict):
        raise ShipmentError(f'{what} must hold one JSON object {{"tags": ..., "properties": ...}}')


def _table(text: str) -> list[tuple[int, list[str]]]:
    """The CSV's rows that hold anything, each with the file's line it ends on."""
    bad = _CONTROL.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise ShipmentError(
            f"line {line} holds the control character U+{ord(bad.group()):04X}: not a shipment's text"
        )
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    table: list[tuple[int, list[str]]] = []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                table.append((reader.line_num, row))
    except csv.Error as exc:
        raise ShipmentError(f"the shipment is not readable CSV (line {reader.line_num}: {exc})") from None
    return table


def _no_column_twice(header: Sequence[str]) -> None:
    """A column named twice (or by two of its names, ``guid`` and ``device_id``) would leave one value
    unused without a word: refused."""
    seen: dict[str, int] = {}
    for index, name in enumerate(header, start=1):
        key = name.strip().lower()
        role = next((names[0] for names in _ALIASES if key in names), name.strip())
        if role in seen:
            raise ShipmentError(f"column {index} ({name!r}) is column {seen[role]} again: name each once")
        seen[role] = index


def read_shipment(
    text: str,
    fields: FieldSet | None,
    *,
    metadata_json: str | None = None,
    default_hub: str = "",
    device_ids: DeviceIdPolicy = DeviceIdPolicy.GUID,
    max_rows: int = MAX_ROWS,
) -> list[ShipmentRow]:
    """The rows of a shipment (``ShipmentError`` for a file that cannot be used as a whole)."""
    if metadata_json is not None:
        check_metadata_json(metadata_json, "the metadata")
    table = _table(text.removeprefix("\ufeff"))
    if not table:
        raise ShipmentError(
            "the shipment is empty: a header row (guid, code, hub, ...) and one row per device"
        )
    header = [h.strip() for h in table[0][1]]
    device_col, code_col = _column(header, DEVICE_COLUMNS), _column(header, CODE_COLUMNS)
    if device_col is None or code_col is None:
        raise ShipmentError(f"the shipment's header needs a 'guid' and a 'code' column, got {header}")
    hub_col = _column(header, ("hub",))
    unnamed = next((n for n, name in enumerate(header, start=1) if not name), None)
    if unnamed is not None:
        raise ShipmentError(f"the header's column {unnamed} has no name: name it, or remove it and its cells")
    _no_column_twice(header)
    known = fields.by_name() if fields is not None else {}
    template_cols: dict[int, str] = {}
    for index, name in enumerate(header):
        if index in (device_col, code_col, hub_col):
            continue
        if name not in known:
            names = ", ".join(known) or "none: the OEM has no template"
            raise ShipmentError(f"column {name!r} is not a field of the OEM's template (its fields: {names})")
        template_cols[index] = name
    if template_cols and metadata_json is not None:
        raise ShipmentError("give template columns or one metadata file for every row, not both")
    if len(table) == 1:
        raise ShipmentError("the shipment has a header but no devices")
    if len(table) - 1 > max_rows:
        raise ShipmentError(f"the shipment has {len(table) - 1} rows; at most {max_rows} are taken at once")
    rows: list[ShipmentRow] = []
    seen: dict[str, int] = {}
    for number, row in table[1:]:
        if any(cell.strip() for cell in row[len(header) :]):
            raise ShipmentError(
                f"line {number} has {len(row)} cells, the header {len(header)}: a value with a comma in it "
                "goes in double quotes"
            )
        cells = [cell.strip() for cell in row] + [""] * max(0, len(header) - len(row))
        if any(len(cell) > MAX_CELL for cell in cells):
            raise ShipmentError(f"line {number}: a cell is longer than {MAX_CELL} characters")
        hub = (cells[hub_col] if hub_col is not None else "") or default_hub
        if metadata_json is not None:
            metadata = metadata_json
        elif fields is not None:
            metadata = _canonical(
                metadata_from_values(fields, {n: cells[i] for i, n in template_cols.items()})
            )
        else:
            metadata = ""
        problem: RowResult | None = None
        try:
            device_id = check_device_id(cells[device_col], device_ids)
        except DomainError as exc:
            device_id = ""
            problem = RowResult(
                number, cells[device_col][:64], hub, REFUSED, exc.reason, "device_id", exc.message
            )
        if device_id and device_id in seen:
            problem = RowResult(
                number,
                device_id,
                hub,
                REFUSED,
                BatchReason.DUPLICATE_IN_SHIPMENT,
                "guid",
                f"also on line {seen[device_id]}",
            )
        elif device_id:
            seen[device_id] = number
        request_id = row_request_id(device_id, hub, metadata) if device_id else ""
        rows.append(ShipmentRow(number, device_id, cells[code_col], hub, metadata, request_id, problem))
    return rows


def _outcome(row: ShipmentRow, reply: pb.ActivateResponse) -> RowResult:
    outcome = ALREADY if reply.path == pb.ACTIVATION_PATH_UNCHANGED else ACTIVATED
    return RowResult(
        row.line, reply.device_id, reply.hub, outcome, replayed=reply.replayed, request_id=row.request_id
    )


def _refusal(row: ShipmentRow, exc: grpc.aio.AioRpcError) -> RowResult:
    details = error_details(exc)
    field = (
        details.field_violations[0].field if details.field_violations else details.metadata.get("field", "")
    )
    unreachable = details.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and (
        not details.reason
    )
    return RowResult(
        row.line,
        row.device_id,
        row.hub,
        NOT_SENT if unreachable else REFUSED,
        details.reason or (details.code.name if details.code else "UNKNOWN"),
        field,
        details.message,
        request_id=row.request_id,
    )


async def activate_rows(
    stub: pb_grpc.ActivationServiceStub,
    rows: Sequence[ShipmentRow],
    *,
    concurrency: int = 8,
    call_timeout: float = 60.0,
    extra_metadata: Sequence[tuple[str, str]] = (),
    on_result: Callable[[RowResult], Awaitable[None] | None] | None = None,
    before_row: Callable[[ShipmentRow], Awaitable[RowResult | None]] | None = None,
) -> list[RowResult]:
    """Activate every row, at most ``concurrency`` at once; the results in the rows' order.
    ``before_row`` may answer a row itself (e.g. the portal's per-address limit) instead of sending it."""
    gate = asyncio.Semaphore(max(1, concurrency))
    results: dict[int, RowResult] = {}

    async def one(row: ShipmentRow) -> None:
        async with gate:
            result = row.problem
            if result is None and before_row is not None:
                result = await before_row(row)
            if result is None:
                try:
                    reply = await stub.Activate(
                        pb.ActivateRequest(
                            device_id=row.device_id,
                            activation_code=row.code,
                            metadata_json=row.metadata_json,
                            hub=row.hub,
                            request_id=row.request_id,
                        ),
                        metadata=(*request_metadata(row.request_id), *extra_metadata),
                        timeout=call_timeout,
                    )
                    crash_point("batch.answered")  # the service did it; the result file does not say so yet
                    result = _outcome(row, reply)
                except grpc.aio.AioRpcError as exc:
                    result = _refusal(row, exc)
            results[row.line] = result
            if on_result is not None:
                done = on_result(result)
                if done is not None:
                    await done

    await asyncio.gather(*(one(row) for row in rows))
    return [results[row.line] for row in rows]


class ResultWriter:
    """The result file: a header, then one row per finished device, flushed as it comes."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._csv = csv.writer(out)
        self._csv.writerow(RESULT_COLUMNS)
        out.flush()

    @classmethod
    def open(cls, path: Path) -> ResultWriter:
        return cls(path.open("w", newline="", encoding="utf-8"))

    def write(self, result: RowResult) -> None:
        self._csv.writerow(result.cells())
        self._out.flush()

    def close(self) -> None:
        self._out.close()


def read_results(text: str) -> list[dict[str, str]]:
    """A result file's rows (for tests and scripts)."""
    return list(csv.DictReader(io.StringIO(text, newline="")))
