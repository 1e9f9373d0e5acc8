"""The minting commands of ``factory-svc`` (gathered by ``factory_svc.cli``):

    factory-svc mint DEVICE_ID (--csr FILE | --generate-key [--key-type p256|p384|rsa2048|rsa3072])
                     --out DIR [--validity-days DAYS] [--request-id ID]
    factory-svc list [DEVICE_ID] [--page-size N] [--all] [--json]
    factory-svc get SERIAL [--json]

``mint`` writes ``DIR/<id>.chain.pem`` (leaf, issuing CA, root), ``DIR/<id>.cert.pem`` and, with
``--generate-key``, ``DIR/<id>.key.pem`` (0600).  ``list ID`` of a device that never had a certificate says
so and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, timedelta
from pathlib import Path

from google.protobuf import duration_pb2, timestamp_pb2

from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from litestore import private_directory
from mainkit.shell import CommandFailed, print_json
from provkit.channels import read_input, request_metadata
from provkit.cli_shell import KEY_TYPE_NAMES, add_device_id, add_json, add_key_type, add_request_id
from provkit.devpki import write_private_file

COMMANDS = ("mint", "list", "get")
KEY_TYPES = {
    "p256": pb.KEY_TYPE_EC_P256,
    "p384": pb.KEY_TYPE_EC_P384,
    "rsa2048": pb.KEY_TYPE_RSA_2048,
    "rsa3072": pb.KEY_TYPE_RSA_3072,
}
assert tuple(KEY_TYPES) == KEY_TYPE_NAMES  # the suite's one spelling


def add_parsers(client: Callable[[str, str], argparse.ArgumentParser]) -> None:
    mint = client("mint", "mint a device certificate")
    add_device_id(mint)
    how = mint.add_mutually_exclusive_group(required=True)
    how.add_argument("--csr", type=Path, help="PKCS#10 CSR (PEM) made on the device")
    how.add_argument("--generate-key", action="store_true", help="let the factory generate the key")
    add_key_type(mint, help="with --generate-key: the key's algorithm")
    mint.add_argument(
        "--validity-days",
        type=int,
        metavar="DAYS",
        help="certificate lifetime (default: the factory's policy)",
    )
    add_request_id(mint)
    mint.add_argument("--out", type=Path, required=True, help="directory for the PEM files")
    listing = client("list", "list issued certificates, newest first")
    add_device_id(listing, optional=True, help="only this device's certificates (default: every device's)")
    listing.add_argument("--page-size", type=int, default=50, metavar="N", help="certificates per call")
    listing.add_argument("--all", action="store_true", help="follow all pages")
    add_json(listing, "one JSON object per certificate")
    get = client("get", "show one certificate by serial number")
    get.add_argument("serial_number", help="the certificate's serial number (hex, as `list` shows it)")
    add_json(get, "print the certificate's fields as JSON")


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    return stamp.ToDatetime(tzinfo=UTC).isoformat()


def certificate_fields(cert: pb.IssuedCertificate) -> dict[str, str]:
    return {
        "device_id": cert.device_id,
        "serial_number": cert.serial_number,
        "sha1_thumbprint": cert.sha1_thumbprint,
        "sha256_thumbprint": cert.sha256_thumbprint,
        "not_before": _when(cert.not_before),
        "not_after": _when(cert.not_after),
        "caller_identity": cert.caller_identity,
    }


def _show(cert: pb.IssuedCertificate) -> str:
    return (
        f"device id   {cert.device_id}\n"
        f"serial      {cert.serial_number}\n"
        f"sha1        {cert.sha1_thumbprint}\n"
        f"sha256      {cert.sha256_thumbprint}\n"
        f"valid       {_when(cert.not_before)} .. {_when(cert.not_after)}\n"
        f"caller      {cert.caller_identity}"
        + (f"\nREVOKED     {_when(cert.revocation_time)}" if cert.revoked else "")
    )


async def _mint(stub: pb_grpc.FactoryServiceStub, args: argparse.Namespace) -> int:
    request = pb.MintCertificateRequest(
        device_id=args.device_id, request_id=args.request_id or str(uuid.uuid4())
    )
    if args.csr:
        request.csr_pem = read_input(args.csr, "CSR file")
    else:
        request.server_key_generation.key_type = KEY_TYPES[args.key_type]
    if args.validity_days is not None:
        request.validity.CopyFrom(
            duration_pb2.Duration(seconds=int(timedelta(days=args.validity_days).total_seconds()))
        )
    reply: pb.MintCertificateResponse = await stub.MintCertificate(
        request, metadata=request_metadata(request.request_id), timeout=args.timeout
    )
    cert = reply.certificate
    private_directory(args.out)  # may hold the key
    chain_path = args.out / f"{cert.device_id}.chain.pem"
    chain_path.write_text(cert.certificate_chain_pem)
    (args.out / f"{cert.device_id}.cert.pem").write_text(cert.certificate_pem)
    print(_show(cert))
    print(f"unexpired   {reply.unexpired_certificate_count} certificate(s) for this id")
    print(f"chain       {chain_path}")
    if reply.private_key_pem:
        key_path = args.out / f"{cert.device_id}.key.pem"
        write_private_file(key_path, reply.private_key_pem.encode())
        print(f"key         {key_path} (0600; the factory kept no copy)")
    elif reply.replayed and args.generate_key:
        print(
            "note        replay of an earlier request: the key was returned only the first time",
            file=sys.stderr,
        )
    return 0


async def _list(stub: pb_grpc.FactoryServiceStub, args: argparse.Namespace) -> int:
    token = ""
    shown = 0
    while True:
        reply = await stub.ListCertificates(
            pb.ListCertificatesRequest(device_id=args.device_id, page_size=args.page_size, page_token=token),
            timeout=args.timeout,
        )
        for cert in reply.certificates:
            shown += 1
            if args.json:
                print_json(certificate_fields(cert), indent=None)
            else:
                print(
                    f"{cert.serial_number}  {cert.device_id}  not_after={_when(cert.not_after)}  "
                    f"sha256={cert.sha256_thumbprint}"
                )
        token = reply.next_page_token
        if not token or not args.all:
            break
    if shown:
        return 0
    if args.device_id:
        raise CommandFailed(
            f"no certificate was ever issued for device {args.device_id}",
            hints=[f"mint one: factory-svc mint {args.device_id} --csr FILE --out DIR"],
        )
    if not args.json:
        print("no certificates issued yet", file=sys.stderr)
    return 0


async def _get(stub: pb_grpc.FactoryServiceStub, args: argparse.Namespace) -> int:
    reply = await stub.GetCertificate(pb.GetCertificateRequest(serial_number=args.serial_number))
    if args.json:
        print_json(certificate_fields(reply.certificate))
    else:
        print(_show(reply.certificate))
    return 0


async def run(stub: pb_grpc.FactoryServiceStub, args: argparse.Namespace) -> int:
    if args.command == "mint":
        return await _mint(stub, args)
    if args.command == "list":
        return await _list(stub, args)
    return await _get(stub, args)
