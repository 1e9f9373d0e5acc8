"""``factory-svc enrollment-group``: create or update group mode's DPS enrollment group (the operator's
command; ``factory_svc.enrollment.group`` says what it writes).

    factory-svc enrollment-group [--group-id ID] [--webhook-url URL] [--hub HOST ...]
                                 [--signing-certificate issuing|root] [--json] [--config FILE]

Run where the factory's settings are (``--config`` / ``FACTORY_*``: its CA chain and its cloud settings,
the emulator's connection file or real Azure's DPS connection string); the function key comes from
``FACTORY_GROUP_FUNCTION_KEY`` (or ``_FILE``), never from the command line.  Prints ``enrollment group
<id>: created|updated|unchanged`` with its hubs and signing certificate thumbprint, or with ``--json`` one
object (``group_id``, ``outcome``, ``etag``, ``signing_certificate_sha256``, ``iot_hubs``,
``webhook_url`` without the key).  Exit 0 done (``unchanged`` too when a concurrent run wrote the same
settings first), 1 DPS refused, 2 settings, 3 DPS unreachable, 4 a concurrent run wrote the group first with
other settings (ENROLLMENT_GROUP_CONFLICT: what DPS holds is told, nothing of this run written) or kept
changing it (ENROLLMENT_CONCURRENTLY_MODIFIED).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from factory_svc.enrollment.group import (
    DEFAULT_GROUP_ID,
    GroupConflict,
    GroupOutcome,
    apply_group,
    load_group_settings,
    wanted_group,
    without_key,
)
from factory_svc.errors import Reason
from mainkit.shell import CommandFailed, print_json
from provkit.cli_shell import EXIT_REFUSED, EXIT_UNREACHABLE, add_json
from provkit.clock import now_utc
from provkit.cloud import CloudError, CloudUnavailable, EnrollmentGroup, slot_sha256
from provkit.errors import Aborted
from provkit.settings import SettingsError, SettingsSource

COMMANDS = ("enrollment-group",)
EXIT_CONFLICT = 4


def add_parsers(sub: Any) -> None:
    cmd = sub.add_parser(
        "enrollment-group",
        allow_abbrev=False,
        help="group mode: create or update the DPS enrollment group over the factory's CA",
    )
    cmd.add_argument(
        "--group-id", metavar="ID", help=f"the group's id (or FACTORY_GROUP_ID; default {DEFAULT_GROUP_ID})"
    )
    cmd.add_argument(
        "--webhook-url",
        metavar="URL",
        help="the allocation webhook, https, without its key (or FACTORY_GROUP_WEBHOOK_URL)",
    )
    cmd.add_argument(
        "--hub",
        action="append",
        metavar="HOST",
        help="a hub to link, repeatable (or FACTORY_GROUP_HUBS; default: every configured hub)",
    )
    cmd.add_argument(
        "--signing-certificate",
        choices=("issuing", "root"),
        help="the CA certificate devices chain to (or FACTORY_GROUP_SIGNING_CERTIFICATE; default issuing)",
    )
    add_json(cmd, "one JSON object instead of a line")
    cmd.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file (or FACTORY_CONFIG)")


async def _apply(args: argparse.Namespace) -> tuple[GroupOutcome, EnrollmentGroup]:
    from factory_svc.ca.settings import open_ca
    from factory_svc.settings import load_settings
    from provkit.dps import DpsEnrollments

    settings = load_settings(config=args.config)
    if settings.enroll is None:
        raise SettingsError("no cloud configured: the enrollment group is written to DPS (FACTORY_CLOUD_*)")
    source = SettingsSource.located("FACTORY", config=args.config)
    flags = {
        "group.id": args.group_id,
        "group.webhook_url": args.webhook_url,
        "group.hubs": args.hub,
        "group.signing_certificate": args.signing_certificate,
    }
    group = load_group_settings(source, settings.enroll.cloud, flags=flags)
    ca = open_ca(settings, now_utc)
    try:
        wanted = wanted_group(group, ca.chain)
    finally:
        ca.close()
    dps = await DpsEnrollments.open(settings.enroll.cloud.dps)
    try:
        return await apply_group(dps, wanted)
    except GroupConflict as exc:
        raise CommandFailed(str(exc), Reason.ENROLLMENT_GROUP_CONFLICT, exit_code=EXIT_CONFLICT) from exc
    except Aborted as exc:
        raise CommandFailed(exc.message, exc.reason, exit_code=EXIT_CONFLICT) from exc
    except CloudUnavailable as exc:
        raise CommandFailed(str(exc), "DPS_UNAVAILABLE", exit_code=EXIT_UNREACHABLE) from exc
    except CloudError as exc:
        raise CommandFailed(str(exc), "DPS_REFUSED", exit_code=EXIT_REFUSED) from exc
    finally:
        await dps.close()


def run(args: argparse.Namespace) -> int:
    outcome, group = asyncio.run(_apply(args))
    thumbprint = group.signing_sha256 or slot_sha256(group.signing_certificate_pem)
    if args.json:
        print_json(
            {
                "group_id": group.group_id,
                "outcome": outcome.value,
                "etag": group.etag,
                "signing_certificate_sha256": thumbprint,
                "iot_hubs": list(group.iot_hubs),
                "webhook_url": without_key(group.webhook_url),
            }
        )
    else:
        print(
            f"enrollment group {group.group_id}: {outcome.value} (hubs {', '.join(group.iot_hubs)}; "
            f"signing certificate {thumbprint}; webhook {without_key(group.webhook_url)})"
        )
    return 0
