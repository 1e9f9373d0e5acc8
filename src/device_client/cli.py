"""`device-client`: provision (factory test bench), run (first boot and every boot), status.

Exit codes: 0 ok (run: stopped by SIGTERM), 2 usage, 3 state directory missing/corrupted/in use, 4 identity
unusable (key does not match certificate, certificate expired), 5 factory unreachable or refused, 6
identity exists (use --force), 7 DPS/hub unusable past --give-up-after, 8 invalid settings, 9 certificate
revoked (the CRL it names lists it; re-provision), 130 interrupted (Ctrl-C, run included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_client.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    DeviceClientError,
    DeviceSettingsError,
    Reason,
    StateError,
)
from device_client.identity import IdentityInfo, KeyType, normalise_guid
from device_client.settings import DEFAULTS, FLAGS, Settings, load_settings
from device_client.state import StateDir
from mainkit.settings import SettingsError
from mainkit.shell import Answer, CommandParser, Verbatim, error_line, print_json, run_command
from provkit import faults
from provkit.channels import STACK_HINT, add_channel_arguments
from provkit.cli_shell import KEY_TYPE_NAMES, add_device_id, add_json, add_key_type

if TYPE_CHECKING:  # the runtime (and the device SDK) load only for `run`
    from device_client.runtime import RuntimeSnapshot

log = logging.getLogger("device_client")

# --key-type: the suite's one spelling (provkit.cli_shell) of the device's key types.
KEY_TYPES = dict(
    zip(KEY_TYPE_NAMES, (KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048, KeyType.RSA_3072), strict=True)
)


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="device-client",
        description="IoT concentrator device client: factory provisioning, DPS registration, telemetry.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("--config", type=Path, help="TOML settings file (also DEVICE_CLIENT_CONFIG)")
    p.add_argument(
        "--state-root",
        help=f"directory with one state directory per device (default {DEFAULTS['state_root']}; "
        "DEVICE_CLIENT_STATE_ROOT)",
    )
    p.add_argument(
        "--log-format", choices=["auto", "json", "text"], help="log lines (default auto: text on a terminal)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (SDK included)")
    sub = p.add_subparsers(dest="command", required=True)

    def prov_flags(sp: argparse.ArgumentParser) -> None:
        # the factory connection: the same options as every client of a service (factory-svc's too)
        add_channel_arguments(
            sp,
            target_help=f"the factory (default {DEFAULTS['factory_address']}; DEVICE_CLIENT_FACTORY_ADDRESS)",
            server_name=False,
            ca_help="CA that signed the factory's certificate: TLS (mTLS with --cert-file; default: the "
            "settings' factory_tls, else plaintext on loopback)",
        )

    def cloud_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--id-scope", help="DPS ID scope")
        sp.add_argument("--global-endpoint", metavar="HOST", help="DPS global device endpoint host")
        sp.add_argument("--trusted-ca-file", metavar="PEM", help="trust anchor for DPS and the hubs")

    prov = sub.add_parser("provision", help="mint the device identity at the factory and enroll it")
    add_device_id(prov, help="the device's hardware GUID (= DPS registration id = hub device id)")
    prov.add_argument("--force", action="store_true", help="replace an existing identity")
    prov.add_argument(
        "--server-keygen",
        action="store_true",
        help="let the factory generate the key (for jigs without crypto); default: key made on the device",
    )
    add_key_type(prov)
    prov.add_argument("--no-enroll", action="store_true", help="mint only; do not create the DPS enrollment")
    prov.add_argument(
        "--request-id", metavar="ID", help="idempotency key for the factory calls (default: new)"
    )
    prov.add_argument(
        "--est-url",
        help="https://host:port of the factory's EST listener: the device renews its certificate there "
        "(kept in the device's settings.toml with the factory CA as its trust anchor)",
    )
    prov_flags(prov)
    cloud_flags(prov)

    run = sub.add_parser("run", help="register (first boot), connect and send telemetry until stopped")
    add_device_id(run)
    run.add_argument(
        "--interval", type=float, metavar="SECONDS", help="between telemetry messages (default 5)"
    )
    run.add_argument(
        "--buffer-max", type=int, metavar="MESSAGES", help="bound of the persisted outbox (default 10000)"
    )
    run.add_argument(
        "--give-up-after",
        type=float,
        metavar="SECONDS",
        help="exit 7 when DPS/the hub stays unusable this long (default 0: never)",
    )
    cloud_flags(run)

    st = sub.add_parser("status", help="identity, certificate expiry, assignment, buffered messages")
    add_device_id(st)
    add_json(st, "machine-readable output")

    sim = sub.add_parser(
        "simulate",
        help="a simulated fleet: provision N devices at the factory, boot them at once in worker processes",
    )
    sim.add_argument(
        "--devices", type=int, metavar="N", help="provision this many new devices (EnrollBatch) and run them"
    )
    sim.add_argument("--existing", action="store_true", help="run every device already under --state-root")
    sim.add_argument("--workers", type=int, metavar="N", help="worker processes (default: one per CPU)")
    sim.add_argument(
        "--batch-size", type=int, default=100, metavar="N", help="devices per EnrollBatch (default 100)"
    )
    sim.add_argument(
        "--seconds", type=float, metavar="SECONDS", help="stop this long after boot (default: at Ctrl-C)"
    )
    sim.add_argument(
        "--until-telemetry",
        action="store_true",
        help="stop once every device's first message is acknowledged",
    )
    sim.add_argument(
        "--spread",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="spread first attempts over this long (default 5)",
    )
    sim.add_argument(
        "--interval", type=float, metavar="SECONDS", help="between telemetry messages (default 5)"
    )
    sim.add_argument("--labels", type=Path, help="write GUIDs and one-time activation codes here (0600)")
    add_json(sim, "print the final report as JSON")
    prov_flags(sim)
    cloud_flags(sim)
    return p


def resolve_settings(args: argparse.Namespace) -> tuple[str, Settings]:
    """The checked device id and the settings (the device's own settings file included)."""
    env = dict(os.environ)  # the one place the environment is read
    overrides = FLAGS.values(args)
    base = load_settings(env=env, config_file=args.config, overrides=overrides)
    guid = normalise_guid(args.device_id, base.device_ids)
    device = StateDir(base.state_root, guid)
    settings = load_settings(
        env=env, config_file=args.config, device_settings=device.settings_path, overrides=overrides
    )
    return guid, settings


def _configure_logging(fmt: str, verbose: bool) -> None:
    from provkit.logging import configure_logging

    configure_logging("DEBUG" if verbose else "INFO", json_lines={"json": True, "text": False}.get(fmt))
    # The SDK logs every pipeline step at INFO; keep it to warnings unless asked.
    for noisy in ("azure.iot.device", "paho"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _say(exc: DeviceClientError, prog: str) -> int:
    print(error_line(prog, exc.message, exc.reason), file=sys.stderr)
    for hint in exc.hints:
        print(f"  {hint}", file=sys.stderr)
    return exc.exit_code


# What device-client says for the failures it knows (anything else is a bug: mainkit.shell).
ANSWERS = (
    Answer(DeviceClientError, _say),
    Answer(SettingsError, lambda exc, prog: _say(DeviceSettingsError(str(exc), exc.reason), prog)),
)


def _state_missing_hints(exc: StateError, guid: str, settings: Settings) -> StateError:
    """A device with no state here may well have one elsewhere: under the default state root, the
    likeliest cause is a shell not pointed at the stack's (``make up``: var/up/env.sh)."""
    if exc.reason != Reason.STATE_DIR_MISSING:
        return exc
    exc.message = f"no state for device {guid!r} in {settings.state_root}"
    hints = ["provisioned elsewhere? --state-root DIR (or DEVICE_CLIENT_STATE_ROOT)"]
    if settings.state_root == Path(DEFAULTS["state_root"]):
        hints.insert(0, STACK_HINT)
    exc.hints = (*hints, f"a new device: device-client provision {guid}")
    return exc


def _command(args: argparse.Namespace) -> int:
    if args.command == "simulate":
        from device_client.simulate import simulate

        base = load_settings(env=dict(os.environ), config_file=args.config, overrides=FLAGS.values(args))
        return simulate(args, base)
    guid, settings = resolve_settings(args)
    _configure_logging(settings.log_format, args.verbose)
    if args.command == "provision":
        return _provision(args, guid, settings)
    try:
        if args.command == "run":
            return _run(guid, settings)
        return _status(guid, settings, as_json=args.json)
    except StateError as exc:
        raise _state_missing_hints(exc, guid, settings) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    faults.arm_from_environment()
    return run_command(lambda: _command(args), prog="device-client", answers=ANSWERS)


# -- provision -------------------------------------------------------------------------------------
def _provision(args: argparse.Namespace, guid: str, settings: Settings) -> int:
    from device_client.provisioning import ProvisionRequest, provision

    request = ProvisionRequest(
        guid=guid,
        key_type=KEY_TYPES[args.key_type],
        server_keygen=args.server_keygen,
        enroll=not args.no_enroll,
        force=args.force,
        request_id=args.request_id,
    )
    result = asyncio.run(provision(request, settings))
    info = result.identity
    print(f"device       {guid}")
    print(f"state        {result.state_path}")
    print(
        f"key          {'generated by the factory' if args.server_keygen else 'generated on the device'} "
        f"({info.key_type})"
    )
    print(f"serial       {info.serial_hex}")
    print(f"thumbprint   {info.thumbprint_sha1} (SHA-1)  {info.thumbprint_sha256} (SHA-256)")
    print(f"valid until  {info.not_after.isoformat()}")
    print(f"enrollment   {_ENROLLMENT_NOW.get(result.enrollment, result.enrollment)}")
    if result.activation_code:
        # For the label next to the GUID; never stored on the device, never logged.
        if result.enrollment.endswith("(unchanged)"):
            what = "issued earlier, unchanged: a label printed with it stays right"
        else:
            what = "new: print it on the label"
        print(f"ACTIVATION CODE ({what}): {result.activation_code}")
    return EXIT_OK


# What an enrollment's outcome (provisioning.ProvisionResult.enrollment) means for the device now, and
# (status) what it meant when it was provisioned: enrolled is not yet enabled.
_UNTIL = "disabled until the OEM activates it"
_ENROLLMENT_NOW = {
    "live": f"in DPS, {_UNTIL}",
    "live (unchanged)": f"in DPS already (unchanged), {_UNTIL}",
    "queued": f"queued for DPS at the factory, {_UNTIL}",
    "queued (unchanged)": f"queued for DPS at the factory already, {_UNTIL}",
    "skipped": "none (--no-enroll)",
}
_ENROLLMENT_THEN = {
    "live": "in DPS since provisioning (disabled until activated)",
    "live (unchanged)": "in DPS since provisioning (disabled until activated)",
    "queued": "queued for DPS at provisioning (disabled until activated)",
    "queued (unchanged)": "queued for DPS at provisioning (disabled until activated)",
    "skipped": "none (provisioned with --no-enroll)",
}


# -- run -------------------------------------------------------------------------------------------
# CONNECTED and SENDING alternate with every message: for a person both are "connected".
_LOGGED_STATE = {"SENDING": "CONNECTED"}
# The runtime itself tells of registration results, connections and waiting for activation; a failure is
# told by the error that ends the run (no FAILED line before it), the end by the "stopped:" line.
_STATE_TEXT = {"REGISTERING": "registering with DPS"}


class RunLogger:
    """What ``run`` adds to the runtime's own lines: state changes nobody else tells (only when the state
    really changes) and one line per message the hub acknowledged, with its sequence number."""

    def __init__(self, guid: str) -> None:
        self._guid = guid
        self._state: str | None = None
        self._sent = 0

    def __call__(self, snap: RuntimeSnapshot) -> None:
        extra = {"device_id": self._guid}
        state = _LOGGED_STATE.get(snap.state.value, snap.state.value)
        if state != self._state:
            self._state = state
            if state in _STATE_TEXT:
                log.info("%s", _STATE_TEXT[state], extra={**extra, "state": state})
        if snap.telemetry_sent > self._sent:
            self._sent = snap.telemetry_sent
            log.info(
                "message %s acknowledged by the hub (%d this run, %d waiting)",
                snap.last_seq_sent,
                snap.telemetry_sent,
                snap.pending,
                extra={**extra, "seq": snap.last_seq_sent},
            )


def _run(guid: str, settings: Settings) -> int:
    from device_client.runtime import DeviceRuntime

    logger = RunLogger(guid)
    stopped_by: list[signal.Signals] = []

    async def go() -> None:
        runtime = DeviceRuntime(guid, settings, on_change=logger)

        def stop(sig: signal.Signals) -> None:
            stopped_by.append(sig)
            runtime.stop()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        await runtime.run()
        snap = runtime.snapshot
        log.info(
            "stopped: %d message(s) sent this run, %d buffered",
            snap.telemetry_sent,
            snap.pending,
            extra={"device_id": guid},
        )

    from device_client.dps import cancel_leftover_timers

    try:
        asyncio.run(go())
    finally:
        cancel_leftover_timers()
    # Ctrl-C is an interruption, as everywhere (130); SIGTERM is a service manager's orderly stop (0).
    return EXIT_INTERRUPTED if signal.SIGINT in stopped_by else EXIT_OK


# -- status ----------------------------------------------------------------------------------------
def status_report(guid: str, settings: Settings, *, now: datetime) -> dict[str, Any]:
    import sqlite3

    from device_client.buffer import read_stats

    state = StateDir(settings.state_root, guid)
    ident = state.load_identity()
    info = ident.info
    remaining = info.not_after - now
    assignment = state.read_assignment()
    buffered: dict[str, Any] = {"pending": 0, "dropped": 0, "sent": 0, "next_seq": 1, "oldest_seq": None}
    if state.buffer_path.exists():
        try:
            stats = read_stats(state.buffer_path, settings.runtime.buffer_max_messages)
            buffered = {
                "pending": stats.pending,
                "dropped": stats.dropped,
                "sent": stats.sent,
                "next_seq": stats.next_seq,
                "oldest_seq": stats.oldest_seq,
            }
        except sqlite3.OperationalError:
            buffered["error"] = "buffer busy"
    desired = state.read_desired()
    revoked = state.read_revocation(info.serial_hex)
    return {
        "device": guid,
        "state_dir": str(state.path),
        "identity": {
            "key_type": info.key_type,
            "key_origin": ident.metadata.get("key_origin"),
            "serial": info.serial_hex,
            "thumbprint_sha1": info.thumbprint_sha1,
            "thumbprint_sha256": info.thumbprint_sha256,
            "issuer": info.issuer,
            "not_before": info.not_before.isoformat(),
            "not_after": info.not_after.isoformat(),
            "expired": remaining.total_seconds() <= 0,
            "days_left": round(remaining.total_seconds() / 86400, 1),
            "enrollment": "revoked" if revoked else ident.metadata.get("enrollment"),
        },
        "revocation": revoked.to_json() if revoked else None,
        "assignment": assignment.to_json() if assignment else None,
        "telemetry": buffered,
        "desired": {"version": desired.version, "properties": Verbatim(desired.properties)}
        if desired
        else None,
        "renewal": _renewal_report(state, settings, info),
    }


def _renewal_report(state: StateDir, settings: Settings, info: IdentityInfo) -> dict[str, Any]:
    """When the certificate falls due, what the last renewal did, and a renewed identity not yet in use."""
    from device_client.renewal import due_at

    rs = settings.renewal
    due = due_at(info.not_before, info.not_after, fraction=rs.fraction, days_before=rs.days_before)
    record = state.read_renewal()
    pending: dict[str, Any] | None = None
    if state.has_pending():
        try:
            p = state.load_pending().info
            pending = {
                "serial": p.serial_hex,
                "not_before": p.not_before.isoformat(),
                "not_after": p.not_after.isoformat(),
            }
        except DeviceClientError as exc:
            pending = {"error": exc.message}
    return {
        "enabled": rs.enabled,
        "est_url": rs.est_url,
        "due_at": due.isoformat(),
        "last": record.to_json() if record else None,
        "pending": pending,
        "previous_kept": state.has_previous(),
    }


def _status(guid: str, settings: Settings, *, as_json: bool) -> int:
    report = status_report(guid, settings, now=datetime.now(UTC))
    if as_json:
        print_json(report)
        return EXIT_OK
    ident = report["identity"]
    expiry = "EXPIRED" if ident["expired"] else f"{ident['days_left']} days left"
    a = report["assignment"]
    t = report["telemetry"]
    print(f"device       {guid}")
    print(f"state        {report['state_dir']}")
    print(
        f"identity     {ident['key_type']} key ({ident['key_origin'] or 'unknown origin'}), "
        f"serial {ident['serial']}"
    )
    print(f"thumbprint   {ident['thumbprint_sha1']}")
    print(f"certificate  valid until {ident['not_after']} ({expiry})")
    enrollment = ident["enrollment"] or "unknown"
    print(f"enrollment   {_ENROLLMENT_THEN.get(enrollment, enrollment)}")
    if report["revocation"]:
        r = report["revocation"]
        why = f" ({r['reason']})" if r["reason"] else ""
        where = f"per the CRL {r['crl_url']}, checked {r['checked_at']}"
        print(f"revoked      on {r['revoked_at']}{why}, {where}")
    r = report["renewal"]
    renew = f"due {r['due_at']} at {r['est_url']}" if r["enabled"] else "off (no renewal.est_url)"
    print(f"renewal      {renew}")
    if r["last"]:
        last = r["last"]
        why = f" ({last['reason']}: {last['detail']})" if last["reason"] else ""
        print(f"             last: {last['state']} at {last['at']}{why}")
    if r["pending"]:
        pend = r["pending"]
        what = pend.get("error") or f"serial {pend['serial']}, valid until {pend['not_after']}"
        print(f"             pending (received, not yet in use): {what}")
    if a:
        print(f"assignment   hub {a['assigned_hub']}, device id {a['device_id']}, since {a['registered_at']}")
    else:
        print("assignment   none cached (next run registers with DPS)")
    print(
        f"telemetry    {t['pending']} buffered, {t['dropped']} dropped, {t['sent']} sent, "
        f"next sequence number {t['next_seq']}"
    )
    if report["desired"]:
        print(
            f"desired      version {report['desired']['version']}: "
            f"{json.dumps(report['desired']['properties'])}"
        )
    return EXIT_OK
