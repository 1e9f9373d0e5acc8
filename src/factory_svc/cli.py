"""``factory-svc``: run the service, or call it from a shell.  The entry point: it gathers each feature's
commands (``<feature>/cli.py``) and runs the one asked for.

    factory-svc serve [--config FILE]
    factory-svc migrate [--config FILE]     (the database's tables to this version; see dbstore)
    factory-svc mint | list | get ...                           (see factory_svc.mint.cli)
    factory-svc enroll | enroll-batch | enrollment-status ...   (see factory_svc.enrollment.cli)
    factory-svc revoke ...                                      (see factory_svc.revocation.cli)
    factory-svc lot | lot-status ...                            (see factory_svc.lots.cli)
    factory-svc labels LOT_DIR --portal-url URL ...             (see factory_svc.labels.cli)
    factory-svc ca init | show                                  (see factory_svc.ca.cli)
    factory-svc expiring [--within 30d] [--json]                (see factory_svc.renewal.cli)
    factory-svc enrollment-group [--webhook-url URL] ...        (see factory_svc.enrollment.group_cli)

Client commands connect with --target (or FACTORY_CLIENT_TARGET, default 127.0.0.1:50051) using TLS
with --ca-file / --cert-file / --key-file (mTLS), or --insecure for a loopback development server.
Device ids are checked before anything is sent (FACTORY_CLIENT_DEVICE_IDS, see provkit.device_id).
Exit codes: 0 done, 1 refused by the service (the reason is printed) or nothing found, 2 bad usage or
configuration, 3 service unreachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from factory_svc.ca import cli as ca_cli
from factory_svc.enrollment import cli as enroll_cli
from factory_svc.enrollment import group_cli
from factory_svc.labels import cli as labels_cli
from factory_svc.lots import cli as lot_cli
from factory_svc.mint import cli as mint_cli
from factory_svc.renewal import cli as renewal_cli
from factory_svc.revocation import cli as revoke_cli
from mainkit.shell import CommandParser
from provkit import faults
from provkit.channels import (
    CHANNEL_FLAGS,
    add_channel_arguments,
    channel_security,
    create_channel,
    explained,
)
from provkit.cli_shell import add_timeout, run_cli
from provkit.device_id import check_device_id
from provkit.grpc_server import serve_command
from provkit.settings import SettingsSource, device_id_policy
from provkit.storage_cli import add_migrate_command, run_migrations

DEFAULT_TARGET = "127.0.0.1:50051"


class ClientCommands(Protocol):
    """A feature's ``cli`` module whose commands call the service."""

    @property
    def COMMANDS(self) -> tuple[str, ...]: ...

    def add_parsers(self, client: Callable[[str, str], argparse.ArgumentParser]) -> None: ...

    async def run(self, stub: pb_grpc.FactoryServiceStub, args: argparse.Namespace) -> int: ...


CLIENT_FEATURES: tuple[ClientCommands, ...] = (mint_cli, enroll_cli, revoke_cli, lot_cli)  # --help order


def _parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = CommandParser(
        prog="factory-svc", description="Device certificate factory."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC service")
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file (or FACTORY_CONFIG)")
    add_migrate_command(sub, "FACTORY_CONFIG")

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        add_channel_arguments(
            cmd, target_help=f"the factory (or FACTORY_CLIENT_TARGET; default {DEFAULT_TARGET})"
        )
        add_timeout(cmd)
        return cmd

    for feature in CLIENT_FEATURES:
        feature.add_parsers(client)
    ca_cli.add_parsers(sub)
    renewal_cli.add_parsers(sub)
    labels_cli.add_parsers(sub)
    group_cli.add_parsers(sub)
    return parser


def _check_ids(args: argparse.Namespace, source: SettingsSource) -> None:
    """The device ids a command names, checked before anything is sent (InvalidArgument: the shell says
    what is wrong, exit 2)."""
    policy = device_id_policy(source)
    if getattr(args, "device_id", ""):
        args.device_id = check_device_id(args.device_id, policy)


def _feature(args: argparse.Namespace) -> ClientCommands:
    """The feature whose ``run`` serves the command: ``enroll-batch --lot`` is the lot's (its manifest)."""
    if args.command == "enroll-batch" and args.lot is not None:
        return lot_cli
    return next(f for f in CLIENT_FEATURES if args.command in f.COMMANDS)


async def _call(args: argparse.Namespace, source: SettingsSource) -> int:
    target = source.text("target", DEFAULT_TARGET) or DEFAULT_TARGET
    security = channel_security(source)
    async with (
        create_channel(target, security) as channel,
        explained(target, security, service="the factory"),
    ):
        stub = pb_grpc.FactoryServiceStub(channel)
        feature = _feature(args)
        return await feature.run(stub, args)  # a refused call: the shell reports it (exit 1, or 3)


def _client(args: argparse.Namespace) -> int:
    source = SettingsSource("FACTORY_CLIENT", flags=CHANNEL_FLAGS.values(args))
    _check_ids(args, source)
    return asyncio.run(_call(args, source))


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


def _command(args: argparse.Namespace) -> int:
    if args.command == "migrate":
        return _migrate(args.config)
    if args.command == "serve":
        from factory_svc.app import run_server
        from factory_svc.settings import load_settings

        return serve_command(load_settings(config=args.config), run_server)
    if args.command == "ca":
        from factory_svc.settings import load_settings

        return ca_cli.run(args, lambda config: load_settings(config=config))
    if args.command in renewal_cli.COMMANDS:
        return renewal_cli.run(args)
    if args.command in labels_cli.COMMANDS:
        return labels_cli.run(args)
    if args.command in group_cli.COMMANDS:
        return group_cli.run(args)
    return _client(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    faults.arm_from_environment()
    # errors, exit codes, Ctrl-C and broken pipes: the suite's shell (provkit.cli_shell)
    return run_cli(lambda: _command(args), prog="factory-svc")


if __name__ == "__main__":
    sys.exit(main())
