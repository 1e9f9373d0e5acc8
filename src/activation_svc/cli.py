"""``activation-svc``: run the service, or call it from a shell.

    activation-svc serve [--config FILE]
    activation-svc activate ID [--metadata FILE | --metadata-json JSON] [--hub HOST] [--request-id ID]
    activation-svc deactivate ID [--request-id ID]
    activation-svc status ID
    activation-svc portal [--listen HOST:PORT] [--config FILE]   (see activation_svc.portal.cli)

The activation code is a secret and never an argument: it is read from ``--code-file FILE``, from the
environment (ACTIVATION_CLIENT_CODE), or asked for at the terminal (hidden input); ``--code-file -`` reads
it from standard input.  Client commands connect with ``--target`` (or ACTIVATION_CLIENT_TARGET, default
127.0.0.1:50052) over TLS with ``--ca-file`` / ``--cert-file`` / ``--key-file`` (mTLS), or ``--insecure``
for a loopback development server (the same options as FACTORY_CLIENT_* under ACTIVATION_CLIENT_*).
Exit codes: 0 done, 1 refused by the service (the reason is printed), 2 bad usage or configuration,
3 service unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import uuid
from datetime import UTC
from pathlib import Path

import grpc

from activation_svc.portal.cli import add_portal_command, run_portal
from devprov.v1 import activation_service_pb2 as pb
from devprov.v1 import activation_service_pb2_grpc as pb_grpc
from provkit.channels import (
    EXIT_USAGE,
    ChannelSecurity,
    add_channel_arguments,
    create_channel,
    report_failed_call,
    request_metadata,
)
from provkit.grpc_server import ServerConfigError
from provkit.logging import configure_logging
from provkit.settings import SettingsError, SettingsSource

DEFAULT_TARGET = "127.0.0.1:50052"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="activation-svc", description="Device activation service.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC service")
    serve.add_argument("--config", type=Path, help="TOML settings file (or ACTIVATION_CONFIG)")

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("device_id")
        cmd.add_argument("--code-file", help="file holding the activation code ('-' = standard input)")
        add_channel_arguments(cmd, target_help="host:port (or ACTIVATION_CLIENT_TARGET)")
        cmd.add_argument("--timeout", type=float, default=60.0)
        cmd.add_argument("--json", action="store_true", help="print the answer as JSON")
        return cmd

    activate = client("activate", "activate a device with its metadata and hub")
    how = activate.add_mutually_exclusive_group()
    how.add_argument(
        "--metadata", type=Path, help='JSON file: {"tags": {...}, "properties": {"desired": {...}}}'
    )
    how.add_argument("--metadata-json", help="the same JSON inline")
    activate.add_argument(
        "--hub", default="", help="linked hub host name (default: the service's default hub)"
    )
    activate.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    deactivate = client("deactivate", "deprovision a device (enrollment and hub identity disabled)")
    deactivate.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    client("status", "show a device's lifecycle state")
    add_portal_command(sub)
    return parser


def _code(args: argparse.Namespace, source: SettingsSource) -> str:
    if args.code_file == "-":
        return sys.stdin.readline().strip()
    if args.code_file:
        return Path(args.code_file).read_text().strip()
    secret = source.secret("code")
    if secret is not None:
        return secret.reveal().strip()
    if sys.stdin.isatty():
        return getpass.getpass("activation code: ").strip()
    raise ValueError("no activation code: use --code-file, ACTIVATION_CLIENT_CODE or a terminal")


def _security(args: argparse.Namespace, source: SettingsSource) -> ChannelSecurity:
    return ChannelSecurity.from_files(
        ca_file=args.ca_file or source.path("ca_file"),
        cert_file=args.cert_file or source.path("cert_file"),
        key_file=args.key_file or source.path("key_file"),
        server_name=args.server_name or source.text("server_name"),
        insecure=args.insecure or source.flag("insecure", False),
    )


def _name(enum_type: object, value: int, prefix: str) -> str:
    return enum_type.Name(value).removeprefix(prefix)  # type: ignore[attr-defined]


def _print(args: argparse.Namespace, fields: dict[str, object]) -> None:
    if args.json:
        print(json.dumps(fields, indent=2))
        return
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        if value not in ("", None):
            print(f"{key:<{width}}  {value}")


async def _call(args: argparse.Namespace) -> int:
    source = SettingsSource("ACTIVATION_CLIENT")
    code = _code(args, source)
    metadata_json = ""
    if args.command == "activate":
        if args.metadata is not None:
            metadata_json = args.metadata.read_text()
        elif args.metadata_json is not None:
            metadata_json = args.metadata_json
    target = args.target or source.text("target", DEFAULT_TARGET) or DEFAULT_TARGET
    async with create_channel(target, _security(args, source)) as channel:
        stub = pb_grpc.ActivationServiceStub(channel)
        try:
            if args.command == "activate":
                request_id = args.request_id or str(uuid.uuid4())
                reply = await stub.Activate(
                    pb.ActivateRequest(
                        device_id=args.device_id,
                        activation_code=code,
                        metadata_json=metadata_json,
                        hub=args.hub,
                        request_id=request_id,
                    ),
                    metadata=request_metadata(request_id),
                    timeout=args.timeout,
                )
                _print(
                    args,
                    {
                        "device id": reply.device_id,
                        "hub": reply.hub,
                        "path": _name(pb.ActivationPath, reply.path, "ACTIVATION_PATH_"),
                        "lifecycle": _name(pb.Lifecycle, reply.lifecycle, "LIFECYCLE_"),
                        "registered hub": reply.registered_hub,
                        "replayed": reply.replayed or "",
                    },
                )
            elif args.command == "deactivate":
                request_id = args.request_id or str(uuid.uuid4())
                reply = await stub.Deactivate(
                    pb.DeactivateRequest(
                        device_id=args.device_id, activation_code=code, request_id=request_id
                    ),
                    metadata=request_metadata(request_id),
                    timeout=args.timeout,
                )
                _print(
                    args,
                    {
                        "device id": reply.device_id,
                        "changed": reply.changed,
                        "hub device disabled": reply.hub_device_disabled,
                        "lifecycle": _name(pb.Lifecycle, reply.lifecycle, "LIFECYCLE_"),
                    },
                )
            else:
                reply = await stub.GetDeviceStatus(
                    pb.GetDeviceStatusRequest(device_id=args.device_id, activation_code=code),
                    timeout=args.timeout,
                )
                stamps = {
                    "last activity": reply.last_activity_time,
                    "activated": reply.activated_time,
                    "deactivated": reply.deactivated_time,
                }
                _print(
                    args,
                    {
                        "device id": reply.device_id,
                        "lifecycle": _name(pb.Lifecycle, reply.lifecycle, "LIFECYCLE_"),
                        "provisioning": reply.provisioning_status,
                        "allocated hub": reply.allocated_hub,
                        "registered hub": reply.registered_hub,
                        "hub device": reply.hub_device_status,
                        "connection": reply.hub_connection_state,
                        **{
                            k: v.ToDatetime(tzinfo=UTC).isoformat() if v.seconds or v.nanos else ""
                            for k, v in stamps.items()
                        },
                    },
                )
            return 0
        except grpc.aio.AioRpcError as exc:
            return report_failed_call(exc)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            from activation_svc.app import run_server
            from activation_svc.settings import load_settings

            settings = load_settings(config=args.config)
            configure_logging(settings.log_level)
            asyncio.run(run_server(settings))
            return 0
        if args.command == "portal":
            return run_portal(args)
        return asyncio.run(_call(args))
    except (SettingsError, ServerConfigError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
