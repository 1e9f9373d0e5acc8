"""``factory-svc``: run the service, or call it from a shell.

    factory-svc serve [--config FILE]
    factory-svc migrate [--config FILE]     (the database's tables to this version; see dbstore)
    factory-svc mint ID (--csr FILE | --generate-key [--key-type p256|p384|rsa2048|rsa3072])
                     --out DIR [--validity-days N] [--request-id ID]
    factory-svc list [ID] [--page-size N] [--all] [--json]
    factory-svc get SERIAL [--json]
    factory-svc enroll | enroll-batch | enrollment-status ...   (see factory_svc.enrollment.cli_commands)

Client commands connect with ``--target`` (or FACTORY_CLIENT_TARGET, default 127.0.0.1:50051) using TLS
with ``--ca-file`` / ``--cert-file`` / ``--key-file`` (mTLS), or ``--insecure`` for a loopback
development server.  Device ids are checked before anything is sent (``FACTORY_CLIENT_DEVICE_IDS``,
see ``provkit.device_id``).  ``mint`` writes ``DIR/<id>.chain.pem`` (leaf, issuing CA, root),
``DIR/<id>.cert.pem`` and, with ``--generate-key``, ``DIR/<id>.key.pem`` (0600).  ``list ID`` of a device
that never had a certificate says so and exits 1.  Exit codes: 0 done, 1 refused by the service (the
reason is printed) or nothing found, 2 bad usage or configuration, 3 service unreachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from datetime import UTC, timedelta
from pathlib import Path

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from factory_svc import ca_cli, lot_cli, revoke_cli
from factory_svc.enrollment import cli_commands as enroll_cli
from factory_svc.errors import CaConfigError
from litestore import SchemaError, private_directory
from provkit import faults
from provkit.channels import (
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    EXIT_USAGE,
    ChannelSecurity,
    add_channel_arguments,
    create_channel,
    describe_os_error,
    read_input,
    report_failed_call,
    request_metadata,
)
from provkit.device_id import check_device_id
from provkit.devpki import write_private_file
from provkit.errors import InvalidArgument
from provkit.grpc_server import ServerConfigError, run_service
from provkit.logging import configure_logging
from provkit.settings import SettingsError, SettingsSource, device_id_policy
from provkit.storage_cli import add_migrate_command, run_migrations

KEY_TYPES = {
    "p256": pb.KEY_TYPE_EC_P256,
    "p384": pb.KEY_TYPE_EC_P384,
    "rsa2048": pb.KEY_TYPE_RSA_2048,
    "rsa3072": pb.KEY_TYPE_RSA_3072,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="factory-svc", description="Device certificate factory."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", allow_abbrev=False, help="run the gRPC service")
    serve.add_argument("--config", type=Path, help="TOML settings file (or FACTORY_CONFIG)")
    add_migrate_command(sub, "FACTORY_CONFIG")

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, allow_abbrev=False, help=help_text)
        add_channel_arguments(cmd, target_help="host:port (or FACTORY_CLIENT_TARGET)")
        cmd.add_argument("--timeout", type=float, default=60.0)
        return cmd

    mint = client("mint", "mint a device certificate")
    mint.add_argument("device_id")
    how = mint.add_mutually_exclusive_group(required=True)
    how.add_argument("--csr", type=Path, help="PKCS#10 CSR (PEM) made on the device")
    how.add_argument("--generate-key", action="store_true", help="let the factory generate the key")
    mint.add_argument("--key-type", choices=sorted(KEY_TYPES), default="p256")
    mint.add_argument("--validity-days", type=int)
    mint.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    mint.add_argument("--out", type=Path, required=True, help="directory for the PEM files")
    listing = client("list", "list issued certificates, newest first")
    listing.add_argument("device_id", nargs="?", default="")
    listing.add_argument("--page-size", type=int, default=50)
    listing.add_argument("--all", action="store_true", help="follow all pages")
    listing.add_argument("--json", action="store_true", help="one JSON object per certificate")
    get = client("get", "show one certificate by serial number")
    get.add_argument("serial_number")
    get.add_argument("--json", action="store_true", help="print the certificate's fields as JSON")
    enroll_cli.add_parsers(client)
    revoke_cli.add_parsers(client)
    lot_cli.add_parsers(client)
    ca_cli.add_parsers(sub)
    return parser


def _security(args: argparse.Namespace, source: SettingsSource) -> ChannelSecurity:
    return ChannelSecurity.from_files(
        ca_file=args.ca_file or source.path("ca_file"),
        cert_file=args.cert_file or source.path("cert_file"),
        key_file=args.key_file or source.path("key_file"),
        server_name=args.server_name or source.text("server_name"),
        insecure=args.insecure or source.flag("insecure", False),
    )


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
                print(json.dumps(certificate_fields(cert), sort_keys=True))
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
        print(f"error: no certificate was ever issued for device {args.device_id}", file=sys.stderr)
        return EXIT_REFUSED
    if not args.json:
        print("no certificates issued yet", file=sys.stderr)
    return 0


def _check_ids(args: argparse.Namespace, source: SettingsSource) -> None:
    """The device ids a command names, checked before anything is sent."""
    policy = device_id_policy(source)
    try:
        if getattr(args, "device_id", ""):
            args.device_id = check_device_id(args.device_id, policy)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


async def _client(args: argparse.Namespace, source: SettingsSource) -> int:
    target = args.target or source.text("target", "127.0.0.1:50051") or "127.0.0.1:50051"
    async with create_channel(target, _security(args, source)) as channel:
        stub = pb_grpc.FactoryServiceStub(channel)
        try:
            if args.command == "mint":
                return await _mint(stub, args)
            if args.command == "list":
                return await _list(stub, args)
            if args.command in enroll_cli.COMMANDS:
                return await enroll_cli.run(stub, args)
            if args.command in lot_cli.COMMANDS:
                return await lot_cli.run(stub, args)
            if args.command in revoke_cli.COMMANDS:
                return await revoke_cli.run(stub, args)
            reply = await stub.GetCertificate(pb.GetCertificateRequest(serial_number=args.serial_number))
            if args.json:
                print(json.dumps(certificate_fields(reply.certificate), indent=2, sort_keys=True))
            else:
                print(_show(reply.certificate))
            return 0
        except grpc.aio.AioRpcError as exc:
            return report_failed_call(exc)


def _migrate(config: Path | None) -> int:
    from factory_svc.enrollment.outbox import Outbox
    from factory_svc.ledger import Ledger
    from factory_svc.settings import load_settings

    url = load_settings(config=config).database_url
    return run_migrations(
        url,
        [
            ("ledger", lambda: Ledger.open(url, migrate=True)),
            ("enrollment outbox", lambda: Outbox.open(url, migrate=True)),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    faults.arm_from_environment()
    try:
        if args.command == "migrate":
            return _migrate(args.config)
        if args.command == "serve":
            from factory_svc.app import run_server
            from factory_svc.settings import load_settings

            settings = load_settings(config=args.config)
            configure_logging(settings.log_level)
            run_service(run_server(settings))
            return 0
        if args.command == "ca":
            return ca_cli.run(args)
        source = SettingsSource("FACTORY_CLIENT")
        _check_ids(args, source)
        return asyncio.run(_client(args, source))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (SettingsError, ServerConfigError, CaConfigError, SchemaError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
