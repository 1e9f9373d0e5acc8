"""The enrollment commands of ``factory-svc`` (wired into ``factory_svc.cli``):

    factory-svc enroll ID --cert FILE [--owner OEM] [--replace [--reason TEXT]] [--request-id ID]
    factory-svc enroll-batch (--dir DIR | FILE ... | --lot LOT_DIR) [--codes-out FILE] [--owner OEM]
                 [--replace [--reason TEXT]] [--chunk N] [--rotate-missing]
    factory-svc rotate-code ID [--codes-out FILE] [--request-id ID]
    factory-svc enrollment-status ID [--json]
    factory-svc transfer-owner ID --to OEM --reason TEXT [--request-id ID]

``enroll`` prints the outcome and, once, the activation code for the label.  ``enroll-batch`` takes the
PEM files ``factory-svc mint`` writes (``<id>.chain.pem``; the id is the file name up to the first dot) or
``factory-svc lot`` writes (``<id>/chain.pem``; the id is the directory's name), or with ``--lot`` the devices
a lot's manifest lists as minted and not yet enrolled (``factory_svc.lots.line``: the codes go to the lot's
``codes.csv``, the manifest records each device's enrollment).  It sends them in chunks (default 100 per
call), shows progress on stderr and appends ``device_id,outcome,delivery,activation_code,error`` lines to
``--codes-out`` (0600: the codes are secrets) as each chunk is answered, fsynced, then tells the service the
labels may be printed
(AcknowledgeActivationCodes).  A crash loses nothing already answered; on exit it names the devices still
open (not answered, or enrolled with no code in the file).  A re-run appends to the same file: the service
answers an unchanged device with its code while it still retains it; ``--rotate-missing`` issues a new code
(RotateActivationCode) for each enrolled device that still has none in the file.  ``rotate-code`` does that
for one device (a lost code, a damaged label).  ``--owner`` names the OEM that bought the devices (only it
may activate them); ``transfer-owner`` names another one for a device not activated yet.  Replacing the
enrollment of an activated or registered device needs ``--reason`` (audited).
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable
from pathlib import Path

from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from factory_svc.enrollment.batch_client import (
    BatchOptions,
    BatchTally,
    batch_files,
    enroll_in_chunks,
    report_open,
    rotate,
    rotate_into,
    rotate_missing,
)
from factory_svc.enrollment.codes_file import CodesFile
from provkit.channels import read_input, request_metadata
from provkit.errors import InputError
from provkit.proto_names import enum_label

COMMANDS = ("enroll", "enroll-batch", "enrollment-status", "transfer-owner", "rotate-code")


def add_parsers(client: Callable[[str, str], argparse.ArgumentParser]) -> None:
    enroll = client("enroll", "enroll a device in DPS (disabled) and get its activation code")
    enroll.add_argument("device_id")
    enroll.add_argument(
        "--cert", type=Path, required=True, help="the device certificate (PEM, chain allowed)"
    )
    enroll.add_argument(
        "--replace", action="store_true", help="replace another certificate / rotate the code"
    )
    enroll.add_argument("--owner", default="", help="the OEM that bought the device (its id, e.g. acme)")
    enroll.add_argument("--reason", default="", help="why an activated device is enrolled again")
    enroll.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    batch = client("enroll-batch", "enroll many devices, with progress")
    batch.add_argument("files", nargs="*", type=Path, help="<id>.chain.pem or <id>/chain.pem files")
    batch.add_argument(
        "--dir", type=Path, help="enroll every <id>.chain.pem and <id>/chain.pem in this directory"
    )
    batch.add_argument(
        "--lot",
        type=Path,
        help="a lot directory (factory-svc lot): enroll what its manifest lists as minted, record it there",
    )
    batch.add_argument(
        "--codes-out",
        type=Path,
        help="CSV of results and codes (0600, appended); with --lot: the lot's codes.csv",
    )
    batch.add_argument("--replace", action="store_true")
    batch.add_argument("--owner", default="", help="the OEM that bought these devices")
    batch.add_argument("--reason", default="", help="why activated devices are enrolled again")
    batch.add_argument("--chunk", type=int, default=100, help="devices per call (at most 1000)")
    batch.add_argument(
        "--rotate-missing",
        action="store_true",
        help="issue a new code for each enrolled device that has none in the codes file",
    )
    rotate = client("rotate-code", "issue a new activation code (the old one stops working)")
    rotate.add_argument("device_id")
    rotate.add_argument("--codes-out", type=Path, help="append the code to this codes file (0600)")
    rotate.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    status = client("enrollment-status", "where a device's enrollment stands (outbox / DPS)")
    status.add_argument("device_id")
    status.add_argument("--json", action="store_true", help="print the fields as JSON")
    transfer = client("transfer-owner", "name another OEM as the owner of a device not activated yet")
    transfer.add_argument("device_id")
    transfer.add_argument("--to", required=True, dest="owner", help="the OEM's id")
    transfer.add_argument("--reason", required=True, help="why (audited)")
    transfer.add_argument("--request-id", help="idempotency key (default: a new UUID)")


def _show(reply: pb.EnrollResponse) -> str:
    lines = [
        f"device id   {reply.device_id}",
        f"outcome     {enum_label(pb.EnrollOutcome, reply.outcome, 'ENROLL_OUTCOME_')}",
        f"delivery    {enum_label(pb.EnrollmentDelivery, reply.delivery, 'ENROLLMENT_DELIVERY_')}",
        f"sha1        {reply.sha1_thumbprint}",
    ]
    if reply.activation_code:
        lines.append(f"code        {reply.activation_code}   (shown once: print it on the label)")
    elif reply.replayed:
        lines.append("code        (replay: the code is no longer kept here; `rotate-code` makes a new one)")
    return "\n".join(lines)


def _batch_files(args: argparse.Namespace) -> list[Path]:
    files = list(args.files)
    if args.dir is not None:
        files.extend(sorted(args.dir.glob("*.chain.pem")))
    if not files:
        raise InputError("give certificate files or --dir")
    return files


async def run(stub: pb_grpc.FactoryServiceStub, args: argparse.Namespace) -> int:
    if args.command == "enroll":
        request_id = args.request_id or str(uuid.uuid4())
        reply = await stub.Enroll(
            pb.EnrollRequest(
                device_id=args.device_id,
                certificate_pem=read_input(args.cert, "certificate file"),
                replace=args.replace,
                request_id=request_id,
                owner_oem=args.owner,
                replace_reason=args.reason,
            ),
            metadata=request_metadata(request_id),
            timeout=args.timeout,
        )
        print(_show(reply))
        return 0
    if args.command == "enrollment-status":
        status = await stub.GetEnrollmentStatus(
            pb.GetEnrollmentStatusRequest(device_id=args.device_id), timeout=args.timeout
        )
        state = enum_label(pb.EnrollmentState, status.state, "ENROLLMENT_STATE_")
        if args.json:
            fields = {
                "device_id": status.device_id,
                "state": state,
                "provisioning_status": status.provisioning_status,
                "attempts": status.attempts,
                "failure_reason": status.failure_reason,
                "failure_message": status.failure_message,
                "owner": status.owner_oem,
                "registration_status": status.registration_status,
                "assigned_hub": status.assigned_hub,
                "hub_connection_state": status.hub_connection_state,
            }
            print(json.dumps(fields, indent=2))
            return 0
        print(f"device id   {status.device_id}")
        print(f"state       {state}")
        if status.provisioning_status:
            print(f"dps status  {status.provisioning_status}")
        print(f"owner       {status.owner_oem or '(none yet: the first activation claims it)'}")
        if status.registration_status:
            print(f"registered  {status.registration_status} {status.assigned_hub}".rstrip())
        if status.attempts:
            print(f"attempts    {status.attempts}")
        if status.failure_reason:
            print(f"last error  {status.failure_reason}: {status.failure_message}")
        return 0
    if args.command == "transfer-owner":
        request_id = args.request_id or str(uuid.uuid4())
        moved = await stub.TransferOwnership(
            pb.TransferOwnershipRequest(
                device_id=args.device_id, owner_oem=args.owner, reason=args.reason, request_id=request_id
            ),
            metadata=request_metadata(request_id),
            timeout=args.timeout,
        )
        before = moved.previous_owner_oem or "(none)"
        change = f"{before} -> {moved.owner_oem}" if moved.changed else f"{moved.owner_oem} (unchanged)"
        print(f"device id   {moved.device_id}\nowner       {change}")
        return 0
    if args.command == "rotate-code":
        return await _rotate_one(stub, args)
    return await _batch(stub, args)


async def _rotate_one(stub: pb_grpc.FactoryServiceStub, args: argparse.Namespace) -> int:
    request_id = args.request_id or str(uuid.uuid4())
    device_id = args.device_id.strip().lower()
    if args.codes_out is None:
        code = await rotate(stub, args.device_id, args.timeout, request_id)
        print(f"device id   {device_id}")
        print(f"code        {code}   (the previous code no longer works; print a new label)")
        return 0
    codes = CodesFile.open(args.codes_out)
    try:
        await rotate_into(stub, codes, device_id, args.timeout, request_id)
    finally:
        codes.close()
    print(f"new activation code of {device_id}: {args.codes_out} (0600)")
    return 0


def batch_options(args: argparse.Namespace) -> BatchOptions:
    return BatchOptions(args.replace, args.owner, args.reason, args.chunk, args.timeout)


async def _batch(stub: pb_grpc.FactoryServiceStub, args: argparse.Namespace) -> int:
    """``enroll-batch`` with files or ``--dir`` (``--lot`` is the lot feature's: ``factory_svc.cli`` routes
    it to ``factory_svc.lots.cli``)."""
    if args.codes_out is None:
        raise InputError("--codes-out is required (the CSV the activation codes go to)")
    items = batch_files(args.files, args.dir)
    codes = CodesFile.open(args.codes_out)
    tally = BatchTally.of(items)
    try:
        await enroll_in_chunks(stub, items, codes, batch_options(args), tally)
        if args.rotate_missing:
            await rotate_missing(stub, codes, tally.without_code, args.timeout)
    finally:
        codes.close()
        report_open(tally)
    print(f"results and activation codes: {args.codes_out} (0600)")
    return 1 if tally.failed or tally.without_code else 0
