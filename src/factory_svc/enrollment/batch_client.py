"""The client side of EnrollBatch, shared by ``enroll-batch`` (files, ``--dir``) and a lot's enrollment
(``factory_svc.lots.line``): devices sent in chunks, each chunk's answers appended to the codes file (fsynced)
before the service is told the codes are safe (AcknowledgeActivationCodes), progress on stderr.

Crash story (``DEVPROV_CRASH_AT``): ``enroll_batch.answered`` (a chunk answered, nothing on disk: the
service retains its codes and answers the same devices UNCHANGED with them on a re-run) and
``enroll_batch.after_chunk`` (the chunk's codes on disk and acknowledged, its ``on_chunk`` done).

API: ``BatchItem``, ``BatchOptions``, ``BatchTally.of(items)``, ``enroll_in_chunks(stub, items, codes,
options, tally, on_chunk)``, ``rotate_missing``, ``acknowledge``, ``report_open``, ``item_id_of(path)``,
``batch_files``.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from factory_svc.enrollment.codes_file import CodesFile, Row
from provkit import faults
from provkit.channels import read_input, request_metadata
from provkit.errors import InputError
from provkit.proto_names import enum_label

LOT_CHAIN = "chain.pem"  # what `factory-svc lot` writes into each device's directory


@dataclass(frozen=True)
class BatchItem:
    device_id: str
    certificate: Path  # PEM, chain allowed


@dataclass(frozen=True)
class BatchOptions:
    replace: bool = False
    owner: str = ""
    reason: str = ""
    chunk: int = 100
    timeout: float = 60.0


@dataclass
class BatchTally:
    """What a run did; ``unanswered`` and ``without_code`` are the devices it leaves open."""

    total: int
    done: int = 0
    enrolled: int = 0
    queued: int = 0
    failed: int = 0
    unanswered: list[str] = field(default_factory=list)
    without_code: list[str] = field(default_factory=list)  # enrolled, no code came back and none on file

    @classmethod
    def of(cls, items: Sequence[BatchItem]) -> BatchTally:
        return cls(len(items), unanswered=[item.device_id.lower() for item in items])


def item_id_of(path: Path) -> str:
    """The device id a certificate file stands for: ``<id>.chain.pem`` (``factory-svc mint``) is its name up
    to the first dot; ``<id>/chain.pem`` (``factory-svc lot``) is its directory's name."""
    if path.name == LOT_CHAIN:
        return path.resolve().parent.name
    return path.name.split(".", 1)[0]


def batch_files(files: Sequence[Path], folder: Path | None) -> list[BatchItem]:
    """The devices of ``enroll-batch FILE... --dir DIR``: the files named, then the directory's
    ``*.chain.pem`` (``mint``) and ``*/chain.pem`` (``lot``), in name order."""
    found = list(files)
    if folder is not None:
        if not folder.is_dir():
            raise InputError(f"--dir {folder} is not a directory")
        in_folder = sorted({*folder.glob("*.chain.pem"), *folder.glob(f"*/{LOT_CHAIN}")})
        if not in_folder:
            raise InputError(
                f"--dir {folder} holds no certificates (neither <id>.chain.pem files nor <id>/{LOT_CHAIN})"
            )
        found.extend(in_folder)
    if not found:
        raise InputError("give certificate files or --dir")
    return [BatchItem(item_id_of(path), path) for path in found]


def result_row(result: pb.EnrollBatchResult) -> Row:
    if result.HasField("error"):
        return (result.device_id, "", "", "", f"{result.error.reason}: {result.error.message}")
    r = result.response
    return (
        r.device_id,
        enum_label(pb.EnrollOutcome, r.outcome, "ENROLL_OUTCOME_"),
        enum_label(pb.EnrollmentDelivery, r.delivery, "ENROLLMENT_DELIVERY_"),
        r.activation_code,
        "",
    )


async def acknowledge(stub: pb_grpc.FactoryServiceStub, rows: Sequence[Row], call_timeout: float) -> None:
    """Tell the service the codes of ``rows`` are safe on disk (call after ``CodesFile.append``)."""
    device_ids = [row[0] for row in rows if row[3]]
    if device_ids:
        request_id = str(uuid.uuid4())
        await stub.AcknowledgeActivationCodes(
            pb.AcknowledgeActivationCodesRequest(device_ids=device_ids, request_id=request_id),
            metadata=request_metadata(request_id),
            timeout=call_timeout,
        )


async def rotate(
    stub: pb_grpc.FactoryServiceStub, device_id: str, call_timeout: float, request_id: str
) -> str:
    reply = await stub.RotateActivationCode(
        pb.RotateActivationCodeRequest(device_id=device_id, request_id=request_id),
        metadata=request_metadata(request_id),
        timeout=call_timeout,
    )
    return str(reply.activation_code)


async def rotate_into(
    stub: pb_grpc.FactoryServiceStub, codes: CodesFile, device_id: str, call_timeout: float, request_id: str
) -> None:
    """Rotate the device's code, append it to the codes file (fsynced), then acknowledge it."""
    rows: list[Row] = [
        (device_id, "ROTATED", "LIVE", await rotate(stub, device_id, call_timeout, request_id), "")
    ]
    codes.append(rows)
    await acknowledge(stub, rows, call_timeout)


async def rotate_missing(
    stub: pb_grpc.FactoryServiceStub, codes: CodesFile, missing: list[str], call_timeout: float
) -> None:
    """A new code for each device in ``missing``, appended and acknowledged one by one; each is taken off
    ``missing`` once its code is on disk (a failed call ends the run with the rest still listed)."""
    for device_id in list(missing):
        await rotate_into(stub, codes, device_id, call_timeout, str(uuid.uuid4()))
        missing.remove(device_id)
        print(f"  {device_id}: new activation code (the old one no longer works)", file=sys.stderr)


async def enroll_in_chunks(
    stub: pb_grpc.FactoryServiceStub,
    items: Sequence[BatchItem],
    codes: CodesFile,
    options: BatchOptions,
    tally: BatchTally,
    on_chunk: Callable[[list[Row]], None] | None = None,
) -> None:
    """Enroll ``items`` (``tally`` made by ``BatchTally.of(items)``), a chunk per EnrollBatch call;
    ``on_chunk(rows)`` runs once a chunk's rows are on disk and acknowledged.  Raises what a call raises;
    ``tally`` then says what is left open (report it with ``report_open`` in a ``finally``)."""
    chunk = max(1, min(1000, options.chunk))
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        request_items = [
            pb.EnrollBatchItem(
                device_id=item.device_id,
                certificate_pem=read_input(item.certificate, "certificate file"),
                replace=options.replace,
                owner_oem=options.owner,
                replace_reason=options.reason,
            )
            for item in part
        ]
        request_id = str(uuid.uuid4())
        reply = await stub.EnrollBatch(
            pb.EnrollBatchRequest(items=request_items, request_id=request_id),
            metadata=request_metadata(request_id),
            timeout=options.timeout,
        )
        faults.crash_point("enroll_batch.answered")  # answered, not yet on disk: the service retains
        rows = [result_row(result) for result in reply.results]
        codes.append(rows)  # on disk before anything else happens
        await acknowledge(stub, rows, options.timeout)
        if on_chunk is not None:
            on_chunk(rows)
        for row, result in zip(rows, reply.results, strict=True):
            if result.HasField("error"):
                print(f"  {row[0]}: {row[4]}", file=sys.stderr)
            elif row[0] not in codes.codes:
                tally.without_code.append(row[0])
        del tally.unanswered[: len(part)]
        tally.done += len(part)
        tally.enrolled += reply.enrolled_count
        tally.queued += reply.queued_count
        tally.failed += reply.failed_count
        print(
            f"[{tally.done}/{tally.total}] enrolled {tally.enrolled}, queued {tally.queued}, "
            f"failed {tally.failed}",
            file=sys.stderr,
            flush=True,
        )
        faults.crash_point("enroll_batch.after_chunk")


def report_open(tally: BatchTally, rotate_hint: str = "run again with --rotate-missing") -> None:
    if tally.unanswered:
        print(
            f"not answered ({len(tally.unanswered)}), run again: {' '.join(tally.unanswered)}",
            file=sys.stderr,
        )
    if tally.without_code:
        print(
            f"enrolled with no code in the file ({len(tally.without_code)}), {rotate_hint}: "
            f"{' '.join(tally.without_code)}",
            file=sys.stderr,
        )
