"""``activation-svc``: run the service, or call it from a shell.

    activation-svc serve [--config FILE]
    activation-svc migrate [--config FILE]     (the database's tables to this version; see dbstore)
    activation-svc activate DEVICE_ID [--metadata FILE | --metadata-json JSON | --clear-metadata]
                                      [--hub HOST] [--request-id ID]
    activation-svc deactivate DEVICE_ID [--request-id ID]
    activation-svc status DEVICE_ID        (the owning OEM needs no code)
    activation-svc activate-batch SHIPMENT.csv [--metadata FILE] [--hub HOST] [--results FILE]
                               [--concurrency N]   (see activation_svc.batch.cli)
    activation-svc portal [--listen HOST:PORT] [--config FILE]   (see activation_svc.portal.cli)

The activation code is a secret and never an argument: it is read from ``--code-file FILE``, from the
environment (ACTIVATION_CLIENT_CODE), or asked for at the terminal (hidden input); ``--code-file -`` reads
it from standard input.  ``status`` asks for none: the OEM that owns the device is answered on its
identity alone; anyone else gives the code the same ways.  A code that cannot be one (the wrong length, a
character not in its alphabet: ``provkit.activation_code.normalise``) is refused here and never sent, so
it never counts as a wrong attempt.  Metadata is checked here against the twin rules before it is sent
(an error names the file).  Client commands connect with ``--target`` (or ACTIVATION_CLIENT_TARGET,
default 127.0.0.1:50052) over TLS with ``--ca-file`` / ``--cert-file`` / ``--key-file`` (mTLS), or
``--insecure`` for a loopback development server (the same options as FACTORY_CLIENT_* under
ACTIVATION_CLIENT_*).  Without ``--metadata`` / ``--metadata-json`` an activation keeps the device's
metadata (tags and desired properties); ``--clear-metadata`` removes it.  Answers are sentences, saying
whether the metadata was kept, replaced or cleared (``--json`` prints the fields for scripts).  The device
id is checked before anything is sent (``ACTIVATION_CLIENT_DEVICE_IDS``, see ``provkit.device_id``).  Exit
codes: 0 done, 1 refused by the service (the reason is printed), 2 bad usage or configuration, 3 service
unreachable, 130 cancelled (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import uuid
from datetime import UTC
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2

from activation_svc.batch.cli import add_batch_command, run_batch
from activation_svc.metadata import parse_metadata
from activation_svc.portal.cli import add_portal_command, run_portal
from devprov.v1 import activation_service_pb2 as pb
from devprov.v1 import activation_service_pb2_grpc as pb_grpc
from mainkit.shell import CommandFailed, CommandParser, print_json
from provkit import faults
from provkit.activation_code import normalise
from provkit.channels import (
    CHANNEL_FLAGS,
    add_channel_arguments,
    channel_security,
    create_channel,
    explained,
    read_input,
    request_metadata,
)
from provkit.cli_shell import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Answer,
    add_device_id,
    add_json,
    add_request_id,
    add_timeout,
    run_cli,
)
from provkit.device_id import check_device_id
from provkit.errors import InputError, InvalidArgument
from provkit.grpc_errors import error_details
from provkit.grpc_server import serve_command
from provkit.proto_names import enum_label
from provkit.settings import SettingsSource, device_id_policy
from provkit.storage_cli import add_migrate_command, run_migrations

DEFAULT_TARGET = "127.0.0.1:50052"


class _RefuseCodeArgument(argparse.Action):
    """``--code X`` is refused without repeating X: a secret on the command line stays in shell history."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object, **__: object) -> None:
        parser.error(
            "the activation code is never a command-line argument (it would stay in the shell history); "
            "type it at the prompt, or use --code-file FILE or ACTIVATION_CLIENT_CODE"
        )


def _parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = CommandParser(
        prog="activation-svc", description="Device activation service."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC service")
    serve.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML settings file (or ACTIVATION_CONFIG)"
    )
    add_migrate_command(sub, "ACTIVATION_CONFIG")

    def client(name: str, help_text: str, code_help: str = "") -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        add_device_id(cmd)
        cmd.add_argument(
            "--code-file",
            metavar="FILE",
            help=code_help or "file holding the activation code ('-' = standard input; default: "
            "ACTIVATION_CLIENT_CODE, else a hidden prompt)",
        )
        cmd.add_argument("--code", nargs="?", action=_RefuseCodeArgument, help=argparse.SUPPRESS)
        add_channel_arguments(
            cmd, target_help=f"the activation service (or ACTIVATION_CLIENT_TARGET; default {DEFAULT_TARGET})"
        )
        add_timeout(cmd)
        add_json(cmd)
        return cmd

    activate = client("activate", "activate a device with its metadata and hub")
    how = activate.add_mutually_exclusive_group()
    how.add_argument(
        "--metadata", type=Path, help='JSON file: {"tags": {...}, "properties": {"desired": {...}}}'
    )
    how.add_argument("--metadata-json", help="the same JSON inline")
    how.add_argument(
        "--clear-metadata",
        action="store_true",
        help="remove the device's tags and desired properties (without metadata they are kept)",
    )
    activate.add_argument(
        "--hub", default="", help="linked hub host name (default: the service's default hub)"
    )
    add_request_id(activate)
    deactivate = client("deactivate", "deprovision a device (enrollment and hub identity disabled)")
    add_request_id(deactivate)
    client(
        "status",
        "show a device's lifecycle state (its owner needs no code)",
        code_help="file holding the activation code ('-' = standard input; default: ACTIVATION_CLIENT_CODE, "
        "else none: the device's owner is answered without it)",
    )
    add_batch_command(sub)
    add_portal_command(sub)
    return parser


class Cancelled(Exception):
    """The person pressed Ctrl-C (or Ctrl-D) at a prompt."""


def _code(args: argparse.Namespace, source: SettingsSource) -> str:
    """The activation code, read before any event loop runs (so Ctrl-C at the prompt is one press);
    ``status`` takes none unless one is given (its owner needs none)."""
    if args.code_file == "-":
        code = sys.stdin.readline().strip()
    elif args.code_file:
        code = read_input(Path(args.code_file), "code file").strip()
    elif (secret := source.secret("code")) is not None:
        code = secret.reveal().strip()
    elif args.command == "status":
        return ""
    elif sys.stdin.isatty():
        try:
            code = getpass.getpass("activation code: ").strip()
        except (KeyboardInterrupt, EOFError):
            raise Cancelled from None
    else:
        raise InputError("no activation code: use --code-file, ACTIVATION_CLIENT_CODE or a terminal")
    if not code:
        raise InputError("the activation code is empty: type the code printed on the device's label")
    if normalise(code) is None:  # never sent: it would only count as a wrong attempt
        raise InputError(
            "that is not an activation code: it has 16 letters and digits, printed in four groups like "
            "7K3M-Q9XD-2HPA-W4RT (nothing was sent)"
        )
    return code


def _checked_metadata(text: str, where: str) -> str:
    """``text`` once it passes the twin rules the service applies; else the problems, naming ``where``."""
    try:
        parse_metadata(text, field="metadata")
    except InvalidArgument as exc:
        problems = [
            f"{v.field.removeprefix('metadata').lstrip('.') or 'the text'}: {v.description}"
            for v in exc.field_violations
        ] or [exc.message]
        raise CommandFailed(
            f"the metadata in {where} is refused: {problems[0]}",
            exc.reason,
            exit_code=EXIT_USAGE,
            hints=problems[1:],
        ) from None
    return text


_METADATA_CLAUSE = {
    pb.METADATA_CHANGE_KEPT: "metadata kept: its tags and desired properties are unchanged",
    pb.METADATA_CHANGE_REPLACED: "metadata replaced by the one sent",
    pb.METADATA_CHANGE_CLEARED: "metadata cleared: its tags and desired properties were removed",
}


def activation_outcome(reply: pb.ActivateResponse) -> str:
    """What an activation did, in the OEM's words (what became of the metadata included; a service that
    does not say, an older one, replaced it)."""
    device, hub, registered = reply.device_id, reply.hub, reply.registered_hub
    kept = reply.metadata_change == pb.METADATA_CHANGE_KEPT
    if reply.path == pb.ACTIVATION_PATH_UNCHANGED:
        how = {
            pb.METADATA_CHANGE_KEPT: "",
            pb.METADATA_CHANGE_CLEARED: " without metadata",
        }.get(reply.metadata_change, " with this metadata")
        text = f"{device} was already activated{how} on hub {hub}; nothing changed"
        text += " (metadata kept)" if kept else ""
    else:
        if reply.path != pb.ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN:
            text = f"activated {device} on hub {hub}; the device will pick it up at its next registration"
        elif kept:  # the twin was left alone: the hub identity was enabled again
            text = f"activated {device}; enabled the live device again on hub {registered}"
        else:
            text = f"activated {device}; updated the live device's twin on hub {registered}"
        if reply.metadata_change in _METADATA_CLAUSE:
            text += "; " + _METADATA_CLAUSE[reply.metadata_change]
    if registered and registered != hub:
        text += (
            f". It is registered on hub {registered} and keeps using it until it registers again, "
            f"then moves to hub {hub}"
        )
    if reply.replayed:
        text += " (an answer repeated for a retried request)"
    return text + "."


def deactivation_outcome(reply: pb.DeactivateResponse) -> str:
    device = reply.device_id
    if not reply.changed:
        text = f"{device} was already deactivated; nothing changed"
    elif reply.hub_device_disabled:
        text = f"deactivated {device}: its enrollment and its hub identity are disabled"
    else:
        text = f"deactivated {device}: its enrollment is disabled (it had not registered with a hub)"
    if reply.replayed:
        text += " (an answer repeated for a retried request)"
    return text + "."


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    return stamp.ToDatetime(tzinfo=UTC).isoformat() if stamp.seconds or stamp.nanos else ""


def status_fields(reply: pb.GetDeviceStatusResponse) -> dict[str, str]:
    """The status's fields, keyed as ``--json`` writes them (an empty one is absent: null there)."""
    return {
        "device_id": reply.device_id,
        "lifecycle": enum_label(pb.Lifecycle, reply.lifecycle, "LIFECYCLE_"),
        "provisioning": reply.provisioning_status,
        "owner": reply.owner_oem,
        "allocated_hub": reply.allocated_hub,
        "registered_hub": reply.registered_hub,
        "hub_device": reply.hub_device_status,
        "connection": reply.hub_connection_state,
        "last_activity": _when(reply.last_activity_time),
        "activated": _when(reply.activated_time),
        "deactivated": _when(reply.deactivated_time),
    }


def _print_fields(fields: dict[str, str]) -> None:
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        if value:
            print(f"{key.replace('_', ' '):<{width}}  {value}")


def _answer(args: argparse.Namespace, fields: dict[str, object], sentence: str) -> None:
    if args.json:
        print_json(fields)
    else:
        print(sentence)


async def _call(
    args: argparse.Namespace, source: SettingsSource, device_id: str, metadata_json: str, code: str
) -> int:
    target = source.text("target", DEFAULT_TARGET) or DEFAULT_TARGET
    security = channel_security(source)
    service = "the activation service"
    async with create_channel(target, security) as channel, explained(target, security, service=service):
        stub = pb_grpc.ActivationServiceStub(channel)
        if args.command == "activate":
            request_id = args.request_id or str(uuid.uuid4())
            reply = await stub.Activate(
                pb.ActivateRequest(
                    device_id=device_id,
                    activation_code=code,
                    metadata_json=metadata_json,
                    hub=args.hub,
                    request_id=request_id,
                    clear_metadata=args.clear_metadata,
                ),
                metadata=request_metadata(request_id),
                timeout=args.timeout,
            )
            fields: dict[str, object] = {
                "device_id": reply.device_id,
                "hub": reply.hub,
                "path": enum_label(pb.ActivationPath, reply.path, "ACTIVATION_PATH_"),
                "metadata": enum_label(pb.MetadataChange, reply.metadata_change, "METADATA_CHANGE_"),
                "lifecycle": enum_label(pb.Lifecycle, reply.lifecycle, "LIFECYCLE_"),
                "registered_hub": reply.registered_hub,
                "owner": reply.owner_oem,
                "replayed": reply.replayed,
            }
            _answer(args, fields, activation_outcome(reply))
        elif args.command == "deactivate":
            request_id = args.request_id or str(uuid.uuid4())
            reply = await stub.Deactivate(
                pb.DeactivateRequest(device_id=device_id, activation_code=code, request_id=request_id),
                metadata=request_metadata(request_id),
                timeout=args.timeout,
            )
            fields = {
                "device_id": reply.device_id,
                "changed": reply.changed,
                "hub_device_disabled": reply.hub_device_disabled,
                "lifecycle": enum_label(pb.Lifecycle, reply.lifecycle, "LIFECYCLE_"),
                "replayed": reply.replayed,
            }
            _answer(args, fields, deactivation_outcome(reply))
        else:
            reply = await _status(stub, device_id, code, args.timeout)
            if args.json:
                print_json(status_fields(reply))
            else:
                _print_fields(status_fields(reply))
        return 0


async def _status(
    stub: pb_grpc.ActivationServiceStub, device_id: str, code: str, deadline_s: float
) -> pb.GetDeviceStatusResponse:
    try:
        reply: pb.GetDeviceStatusResponse = await stub.GetDeviceStatus(
            pb.GetDeviceStatusRequest(device_id=device_id, activation_code=code), timeout=deadline_s
        )
    except grpc.RpcError as exc:
        details = error_details(exc)
        if code or details.code is not grpc.StatusCode.PERMISSION_DENIED:
            raise
        raise CommandFailed(
            f"{details.message} (asked without a code, as the owner)",
            details.reason or details.code.name,
            hints=[
                "only the OEM that owns the device is answered without its code; otherwise give it: "
                "--code-file FILE, or ACTIVATION_CLIENT_CODE"
            ],
        ) from None
    return reply


def _client(args: argparse.Namespace) -> int:
    source = SettingsSource("ACTIVATION_CLIENT", flags=CHANNEL_FLAGS.values(args))
    device_id = check_device_id(args.device_id, device_id_policy(source))
    metadata_json = ""
    if args.command == "activate":
        if args.metadata is not None:
            metadata_json = _checked_metadata(read_input(args.metadata, "metadata file"), str(args.metadata))
        elif args.metadata_json is not None:
            metadata_json = _checked_metadata(args.metadata_json, "--metadata-json")
    code = _code(args, source)  # last: nobody types a secret for a call that cannot be made
    return asyncio.run(_call(args, source, device_id, metadata_json, code))


# What this command says for the failures it knows, before the suite's (provkit.cli_shell).
def _cancelled(_: Cancelled, prog: str) -> int:
    print("\ncancelled; nothing was sent", file=sys.stderr)
    return EXIT_INTERRUPTED


ANSWERS = (Answer(Cancelled, _cancelled),)


def _command(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from activation_svc.app import run_server
        from activation_svc.settings import load_settings

        return serve_command(load_settings(config=args.config), run_server)
    if args.command == "migrate":
        from activation_svc.audit import AuditLog
        from activation_svc.settings import load_settings
        from provkit.registry import DeviceRegistry, ProvisioningMode
        from provkit.storage_cli import Closable

        settings = load_settings(config=args.config)
        url = settings.database_url
        registry = settings.registry_url

        async def open_audit() -> Closable:
            return await AuditLog.open(url, migrate=True)

        async def open_registry() -> Closable:
            return await DeviceRegistry.open(registry, migrate=True)

        run_migrations(url, [("audit", open_audit)])
        if settings.mode is ProvisioningMode.GROUP:  # the device registry (provkit.registry), at its own URL
            run_migrations(registry, [("device registry", open_registry)])
        return 0
    if args.command == "portal":
        return run_portal(args)
    if args.command == "activate-batch":
        return run_batch(args)
    return _client(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    faults.arm_from_environment()
    return run_cli(lambda: _command(args), prog="activation-svc", answers=ANSWERS)


if __name__ == "__main__":
    sys.exit(main())
