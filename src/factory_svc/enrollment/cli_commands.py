"""The enrollment commands of ``factory-svc`` (wired into ``factory_svc.cli``):

    factory-svc enroll ID --cert FILE [--owner OEM] [--replace [--reason TEXT]] [--request-id ID]
    factory-svc enroll-batch (--dir DIR | FILE ...) --codes-out FILE [--owner OEM] [--replace [--reason TEXT]]
                 [--chunk N]
    factory-svc enrollment-status ID [--json]
    factory-svc transfer-owner ID --to OEM --reason TEXT [--request-id ID]

``enroll`` prints the outcome and, once, the activation code for the label.  ``enroll-batch`` takes the
PEM files ``factory-svc mint`` writes (``<id>.chain.pem``; the id is the file name up to the first dot),
sends them in chunks (default 100 per call), shows progress on stderr and writes
``device_id,outcome,delivery,activation_code,error`` lines to ``--codes-out`` (0600: the codes are
secrets).  ``--owner`` names the OEM that bought the devices (only it may activate them);
``transfer-owner`` names another one for a device not activated yet.  Replacing the enrollment of an
activated or registered device needs ``--reason`` (audited).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from provkit.channels import read_input, request_metadata
from provkit.devpki import write_private_file
from provkit.proto_names import enum_label

COMMANDS = ("enroll", "enroll-batch", "enrollment-status", "transfer-owner")


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
    batch.add_argument("files", nargs="*", type=Path, help="<id>.chain.pem files")
    batch.add_argument("--dir", type=Path, help="enroll every *.chain.pem in this directory")
    batch.add_argument("--codes-out", type=Path, required=True, help="CSV of results and codes (0600)")
    batch.add_argument("--replace", action="store_true")
    batch.add_argument("--owner", default="", help="the OEM that bought these devices")
    batch.add_argument("--reason", default="", help="why activated devices are enrolled again")
    batch.add_argument("--chunk", type=int, default=100, help="devices per call (at most 1000)")
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
        lines.append("code        (replay: the code was returned only the first time)")
    return "\n".join(lines)


def _batch_files(args: argparse.Namespace) -> list[Path]:
    files = list(args.files)
    if args.dir is not None:
        files.extend(sorted(args.dir.glob("*.chain.pem")))
    if not files:
        raise ValueError("give certificate files or --dir")
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
            }
            print(json.dumps(fields, indent=2))
            return 0
        print(f"device id   {status.device_id}")
        print(f"state       {state}")
        if status.provisioning_status:
            print(f"dps status  {status.provisioning_status}")
        print(f"owner       {status.owner_oem or '(none yet: the first activation claims it)'}")
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
    return await _batch(stub, args)


async def _batch(stub: pb_grpc.FactoryServiceStub, args: argparse.Namespace) -> int:
    files = _batch_files(args)
    chunk = max(1, min(1000, args.chunk))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["device_id", "outcome", "delivery", "activation_code", "error"])
    done = enrolled = queued = failed = 0
    for start in range(0, len(files), chunk):
        part = files[start : start + chunk]
        items = [
            pb.EnrollBatchItem(
                device_id=f.name.split(".", 1)[0],
                certificate_pem=read_input(f, "certificate file"),
                replace=args.replace,
                owner_oem=args.owner,
                replace_reason=args.reason,
            )
            for f in part
        ]
        request_id = str(uuid.uuid4())
        reply = await stub.EnrollBatch(
            pb.EnrollBatchRequest(items=items, request_id=request_id),
            metadata=request_metadata(request_id),
            timeout=args.timeout,
        )
        for result in reply.results:
            if result.HasField("error"):
                writer.writerow(
                    [result.device_id, "", "", "", f"{result.error.reason}: {result.error.message}"]
                )
                print(f"  {result.device_id}: {result.error.reason}: {result.error.message}", file=sys.stderr)
            else:
                r = result.response
                writer.writerow(
                    [
                        r.device_id,
                        enum_label(pb.EnrollOutcome, r.outcome, "ENROLL_OUTCOME_"),
                        enum_label(pb.EnrollmentDelivery, r.delivery, "ENROLLMENT_DELIVERY_"),
                        r.activation_code,
                        "",
                    ]
                )
        done += len(part)
        enrolled += reply.enrolled_count
        queued += reply.queued_count
        failed += reply.failed_count
        print(
            f"[{done}/{len(files)}] enrolled {enrolled}, queued {queued}, failed {failed}",
            file=sys.stderr,
            flush=True,
        )
    write_private_file(args.codes_out, out.getvalue().encode())
    print(f"results and activation codes: {args.codes_out} (0600)")
    return 1 if failed else 0
