"""``factory-svc revoke``: revoke a device's certificates, or one certificate.

    factory-svc revoke DEVICE_ID|SERIAL --reason <RFC 5280 reason> [--device | --serial] [--request-id ID]

The target is a serial number when it is one the factory issued (asked with GetCertificate first), else a
device id (every unexpired certificate of the device); ``--device`` / ``--serial`` say it outright.
Reasons are RFC 5280's CRLReason names in kebab-case: unspecified, key-compromise, ca-compromise,
affiliation-changed, superseded, cessation-of-operation, certificate-hold, privilege-withdrawn,
aa-compromise.
"""

from __future__ import annotations

import argparse
import re
import uuid
from collections.abc import Callable

import grpc

from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from provkit.channels import request_metadata
from provkit.cli_shell import add_request_id

COMMANDS = ("revoke",)
REASONS = {
    "unspecified": pb.REVOCATION_REASON_UNSPECIFIED,
    "key-compromise": pb.REVOCATION_REASON_KEY_COMPROMISE,
    "ca-compromise": pb.REVOCATION_REASON_CA_COMPROMISE,
    "affiliation-changed": pb.REVOCATION_REASON_AFFILIATION_CHANGED,
    "superseded": pb.REVOCATION_REASON_SUPERSEDED,
    "cessation-of-operation": pb.REVOCATION_REASON_CESSATION_OF_OPERATION,
    "certificate-hold": pb.REVOCATION_REASON_CERTIFICATE_HOLD,
    "privilege-withdrawn": pb.REVOCATION_REASON_PRIVILEGE_WITHDRAWN,
    "aa-compromise": pb.REVOCATION_REASON_AA_COMPROMISE,
}
REASON_NAMES = {v: k for k, v in REASONS.items()}
_SERIAL_LIKE = re.compile(r"^[0-9A-Fa-f:]{1,59}$")


def add_parsers(client: Callable[[str, str], argparse.ArgumentParser]) -> None:
    revoke = client("revoke", "revoke a device's certificates (or one certificate): ledger, CRL, DPS, hub")
    revoke.add_argument(
        "what", metavar="DEVICE_ID|SERIAL", help="device id (GUID) or certificate serial number"
    )
    revoke.add_argument("--reason", required=True, choices=list(REASONS), help="RFC 5280 reason")
    kind = revoke.add_mutually_exclusive_group()
    kind.add_argument("--device", action="store_true", help="the target is a device id")
    kind.add_argument("--serial", action="store_true", help="the target is a serial number")
    add_request_id(revoke, "recorded with the revocation (default: new)")


async def _is_known_serial(stub: pb_grpc.FactoryServiceStub, target: str, deadline_s: float) -> bool:
    if not _SERIAL_LIKE.match(target):
        return False
    try:
        await stub.GetCertificate(pb.GetCertificateRequest(serial_number=target), timeout=deadline_s)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            return False
        raise
    return True


async def run(stub: pb_grpc.FactoryServiceStub, args: argparse.Namespace) -> int:
    request_id = args.request_id or str(uuid.uuid4())
    request = pb.RevokeCertificateRequest(reason=REASONS[args.reason], request_id=request_id)
    if args.serial or (not args.device and await _is_known_serial(stub, args.what, args.timeout)):
        request.serial_number = args.what
    else:
        request.device_id = args.what
    reply: pb.RevokeCertificateResponse = await stub.RevokeCertificate(
        request, metadata=request_metadata(request_id), timeout=args.timeout
    )
    print(f"device id   {reply.device_id}")
    for cert in reply.certificates:
        when = cert.revocation_time.ToDatetime().isoformat()
        print(f"revoked     {cert.serial_number}  {REASON_NAMES[cert.revocation_reason]}  since {when}Z")
    print(f"newly       {reply.newly_revoked_count} of {len(reply.certificates)} certificate(s)")
    enrollment = "disabled now" if reply.enrollment_disabled else "unchanged (none, or not holding them)"
    print(f"enrollment  {enrollment}")
    print(f"hub         {'identity disabled now' if reply.hub_identity_disabled else 'unchanged'}")
    published = reply.crl_this_update.ToDatetime().isoformat()
    print(f"crl         number {reply.crl_number}, published {published}Z")
    return 0
