"""``factory-svc expiring``: the devices whose certificate expires soon, and whether they renewed.

    factory-svc expiring [--within 30d] [--json] [--config FILE]

Read on the factory's host from its ledger (the service's settings: ``--config`` / ``FACTORY_*``; the
SQLite ledger is read beside a running service, PostgreSQL from anywhere the database is reachable).  One
line per unrevoked certificate that expires within the window (not the new ones of renewals still waiting
for the device to use them), soonest first: device id, serial, expiry, and its renewal: ``none``,
``pending`` (a renewal issued, the device not yet using it; with the new serial) or ``done`` (superseded;
with the new serial).  ``--json``: one JSON array of objects with those fields.  ``--within``: a number
with ``d`` (days) or ``h`` (hours).  Exit 0 (an empty list included).
"""

from __future__ import annotations

import argparse
import asyncio
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from factory_svc.renewal.model import ExpiringCertificate
from mainkit.shell import print_json
from provkit.cli_shell import add_json
from provkit.clock import now_utc

COMMANDS = ("expiring",)
_WITHIN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dh]?)\s*$")


def parse_within(text: str) -> timedelta:
    found = _WITHIN.match(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"--within is a number of days (30d) or hours (12h), not {text!r}")
    value = float(found.group(1))
    return timedelta(hours=value) if found.group(2) == "h" else timedelta(days=value)


def add_parsers(sub: Any) -> None:
    cmd = sub.add_parser(
        "expiring", allow_abbrev=False, help="devices whose certificate expires soon, and their renewals"
    )
    cmd.add_argument(
        "--within",
        type=parse_within,
        default=timedelta(days=30),
        metavar="DAYS|HOURS",
        help="window: days (30d) or hours (12h) (default 30d)",
    )
    add_json(cmd, "a JSON array instead of lines")
    cmd.add_argument("--config", type=Path, help="TOML settings file (or FACTORY_CONFIG)")


def _as_json(item: ExpiringCertificate) -> dict[str, Any]:
    return {
        "device_id": item.device_id,
        "serial_number": item.serial_number,
        "not_after": item.not_after.isoformat(),
        "renewal": item.renewal,
        "new_serial_number": item.new_serial,
    }


async def _listing(config: Path | None, within: timedelta) -> list[ExpiringCertificate]:
    from factory_svc.ledger import Ledger
    from factory_svc.settings import load_settings

    ledger = await Ledger.open(load_settings(config=config).database_url)
    try:
        now = now_utc()
        return await ledger.renewals.expiring(now, now + within)
    finally:
        await ledger.close()


def run(args: argparse.Namespace) -> int:
    listing = asyncio.run(_listing(args.config, args.within))
    if args.json:
        print_json([_as_json(item) for item in listing])
        return 0
    for item in listing:
        renewal = item.renewal if item.new_serial is None else f"{item.renewal} ({item.new_serial})"
        print(
            f"{item.device_id}  {item.serial_number}  expires {item.not_after.isoformat()}  renewal {renewal}"
        )
    if not listing:
        print(f"no certificate expires within {args.within}")
    return 0
