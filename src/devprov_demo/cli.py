"""devprov-demo, also python -m devprov_demo (make demo / make up).

    run   start the stack, provision a fleet, print the labels, activate the devices, boot them and watch
          telemetry arrive; Ctrl-C stops everything (exit 130, as Ctrl-C everywhere).
          --seconds N runs N seconds after the devices boot (counted down on screen), prints a summary and
          exits 0 only if every device registered and its hub received telemetry from it (--summary-json
          FILE also writes it).  --cert-minutes N mints
          certificates valid N minutes: each device renews its own over EST (RFC 7030) while its telemetry
          goes on, the view shows each renewal, the summary counts them (and is ok only if every device
          renewed with no gap in its telemetry); --until-renewed stops once each has renewed.
    up    start the stack and keep it up, printing what a person needs to drive the flow by hand.

Both bind loopback only. Every option is also a setting: DEVPROV_DEMO_<OPTION> in the environment
(DEVPROV_DEMO_FACTORY_PORT=6051, DEVPROV_DEMO_HUB_HOSTS=127.0.0.2,127.0.0.3) or the key with
underscores in a TOML file (--config), the option winning over the environment over the file. Defaults:
factory_svc 127.0.0.1:50051 (its EST renewal listener https://127.0.0.1:8443), activation_svc 127.0.0.1:50052,
DPS device endpoint localhost, hubs 127.0.0.2
and 127.0.0.3, each on Azure's ports of its own address (MQTT/TLS 8883; HTTPS 443: its service REST API, so
the connection strings name the bare host, which needs root or CAP_NET_BIND_SERVICE), the activation portal
http://127.0.0.1:8080/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console, RenderableType
from rich.live import Live

from activation_svc.metadata import sample_metadata
from devprov_demo.fleet import (
    Fleet,
    ShortCertificates,
    activate_fleet,
    provision_fleet,
    summary,
    write_json,
)
from devprov_demo.hub_feed import HubFeed
from devprov_demo.stack import MODES, PARTIES, Stack, StackConfig
from devprov_demo.view import (
    LEGEND,
    HubWatch,
    RenewalWatch,
    countdown,
    labels_table,
    live_view,
    status_line,
    summary_table,
)
from mainkit.shell import CommandParser, HelpFormatter
from provkit.cli_shell import EXIT_INTERRUPTED, run_cli
from provkit.settings import FlagKeys, SettingsSource

EXIT_OK, EXIT_INCOMPLETE, EXIT_FAILED = 0, 1, 2


class _Help(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The suite's help, with the description's own line breaks kept."""
STATUS_EVERY_S = 5.0
EXAMPLE_GUID_PREFIX = "3f2a9c1e-0000-4000-8000-"  # the README's example devices
WATCH_EVERY_S = 0.5  # how often `up` looks for a part of the stack that died


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="devprov-demo", description=__doc__, formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True)

    def stack_options(cmd: argparse.ArgumentParser, work_dir: str) -> None:
        cmd.add_argument("--config", type=Path, help="TOML settings file (or DEVPROV_DEMO_CONFIG)")
        cmd.add_argument(
            "--work-dir", type=Path, help=f"state, certificates and logs of the stack (default {work_dir})"
        )
        cmd.add_argument("--dps-host", help="DPS global device endpoint (loopback; default localhost)")
        cmd.add_argument(
            "--hub-host",
            action="append",
            dest="hub_hosts",
            metavar="HOST",
            help="a linked hub's address, repeatable (default 127.0.0.2 and 127.0.0.3)",
        )
        cmd.add_argument(
            "--https-port", type=int, metavar="PORT",
            help="the emulator's HTTPS port of every host (default 443, Azure's; another one goes into the "
            "connection strings)",
        )
        cmd.add_argument(
            "--factory-port", type=int, metavar="PORT", help="factory_svc's gRPC port (default 50051)"
        )
        cmd.add_argument(
            "--activation-port", type=int, metavar="PORT", help="activation_svc's gRPC port (default 50052)"
        )
        cmd.add_argument(
            "--portal-port", type=int, metavar="PORT", help="the activation portal (HTTP; default 8080)"
        )
        cmd.add_argument(
            "--crl-port", type=int, metavar="PORT", help="factory_svc's CRL over HTTP (default 8081)"
        )
        cmd.add_argument(
            "--est-port",
            type=int,
            metavar="PORT",
            help="factory_svc's EST renewal listener (HTTPS, mTLS; default 8443)",
        )
        cmd.add_argument(
            "--mode",
            choices=MODES,
            help="individual (default: one DPS enrollment per device) or group (one enrollment group, "
            "activation_svc's allocation webhook decides each registration; docs/group-mode.md)",
        )
        cmd.add_argument(
            "--webhook-port",
            type=int,
            metavar="PORT",
            help="group mode: activation_svc's allocation webhook (HTTPS; default 8444)",
        )
        cmd.add_argument(
            "--assignment-delay",
            metavar="SECONDS|immediate",
            help="the emulator's DPS: seconds until a registration is assigned (default 1: Azure's flow, "
            "202 assigning then the device polls, the SDK every 2 s); immediate: at once",
        )
        cmd.add_argument(
            "--replicas",
            type=int,
            metavar="N",
            help="N > 1: the services' state in a PostgreSQL cluster of the stack's own (in the work "
            "directory, kept between runs), and N replicas of each service behind its one address (replica n "
            "on the port + 1000 * n, its /metrics too; kill one to watch the others carry on; default 1). In "
            "group mode the device registry is in that cluster and every activation_svc replica serves the "
            "webhook behind --webhook-port (on Azure: several Function instances behind one URL)",
        )
        cmd.add_argument(
            "--metrics-port",
            type=int,
            metavar="PORT",
            help="Prometheus /metrics of factory, activation, portal, emulator on this port and the next "
            "three (default 9101; 0: off; replica n of a service on its port + 1000 * n)",
        )

    run = sub.add_parser("run", help="the whole flow with a live view")
    stack_options(run, WORK_DIRS["run"])
    run.add_argument("--devices", type=int, metavar="N", help="fleet size (default 5)")
    run.add_argument("--interval", type=float, metavar="SECONDS", help="telemetry interval (default 5)")
    run.add_argument(
        "--seconds",
        type=float,
        metavar="SECONDS",
        help="stop this long after the devices boot and print a summary (default: at Ctrl-C)",
    )
    run.add_argument("--summary-json", type=Path, help="also write the summary here")
    run.add_argument(
        "--cert-minutes",
        type=int,
        metavar="MINUTES",
        help="mint certificates valid this many minutes (the factory backdates each 5 minutes against "
        "clock skew) and watch the devices renew them; default: the factory's 730 days",
    )
    run.add_argument(
        "--renew-fraction",
        type=float,
        metavar="FRACTION",
        help="with --cert-minutes: a device renews once this fraction of its certificate's lifetime has "
        "elapsed (default 0.667, the device's own)",
    )
    run.add_argument(
        "--until-renewed",
        action="store_true",
        help="with --cert-minutes: stop once every device has renewed and sent 3 more messages "
        "(--seconds, if given, still caps the run)",
    )

    up = sub.add_parser("up", help="start the stack and keep it up")
    stack_options(up, WORK_DIRS["up"])
    up.add_argument("--fresh", action="store_true", help="wipe the work directory first")
    return parser


# The settings of both commands: these flags over DEVPROV_DEMO_<KEY> over the --config file over DEFAULTS.
FLAGS = FlagKeys(
    {
        key: key
        for key in (
            "work_dir", "dps_host", "hub_hosts", "https_port", "factory_port", "activation_port",
            "portal_port", "crl_port", "est_port", "metrics_port", "replicas", "devices", "interval",
            "seconds", "summary_json", "cert_minutes", "renew_fraction", "until_renewed", "mode",
            "webhook_port", "assignment_delay",
        )
    }
)  # fmt: skip
WORK_DIRS = {"run": "var/demo", "up": "var/up"}
DEFAULTS = {
    "dps_host": "localhost",
    "hub_hosts": ("127.0.0.2", "127.0.0.3"),
    "https_port": 443,
    "factory_port": 50051,
    "activation_port": 50052,
    "portal_port": 8080,
    "crl_port": 8081,
    "est_port": 8443,
    "metrics_port": 9101,
    "replicas": 1,
    "mode": "individual",
    "webhook_port": 8444,
    "devices": 5,
    "interval": 5.0,
}


def _settings(args: argparse.Namespace) -> SettingsSource:
    defaults = {**DEFAULTS, "work_dir": WORK_DIRS[args.command]}
    flags = FLAGS.values(args)
    return SettingsSource.located("DEVPROV_DEMO", config=args.config, flags=flags, defaults=defaults)


def _config(source: SettingsSource, short: ShortCertificates | None = None) -> StackConfig:
    return StackConfig(
        work_dir=source.path("work_dir") or Path(),
        dps_host=source.text("dps_host") or "localhost",
        hub_hosts=source.text_list("hub_hosts"),
        https_port=source.integer("https_port", 443),
        factory_port=source.integer("factory_port", 50051),
        activation_port=source.integer("activation_port", 50052),
        portal_port=source.integer("portal_port", 8080),
        crl_port=source.integer("crl_port", 8081),
        est_port=source.integer("est_port", 8443),
        cert_minutes=None if short is None else short.minutes,
        metrics_port=source.integer("metrics_port", 9101),
        replicas=max(1, source.integer("replicas", 1)),
        mode=(source.text("mode") or "individual").strip().lower(),
        webhook_port=source.integer("webhook_port", 8444),
        assignment_delay=source.text("assignment_delay"),
    )


def _log_to_file(path: Path) -> None:
    """The devices' and SDKs' logs go to a file; the terminal belongs to the view."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _stop_event(received: list[int]) -> asyncio.Event:
    """Set by SIGINT / SIGTERM (each appended to ``received``: see ``_ended``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on(sig: int) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on, sig)
    return stop


def _ended(received: list[int], code: int) -> int:
    """The exit code: 130 after Ctrl-C (SIGINT), as every command of the suite; ``code`` otherwise."""
    return EXIT_INTERRUPTED if signal.SIGINT in received else code


def _stack_facts(stack: Stack) -> list[tuple[str, str]]:
    emu = stack.emulator
    facts = [
        ("provisioning mode", stack.config.mode),
        ("factory_svc (gRPC, mTLS)", stack.config.factory_address),
        ("factory EST renewal (RFC 7030, device certificate)", stack.config.est_url),
        ("activation_svc (gRPC, mTLS)", stack.config.activation_address),
        ("activation portal (web)", stack.config.portal_url),
        *(
            [("allocation webhook (DPS calls it; key in secrets/webhook.key)", stack.config.webhook_url)]
            if stack.config.group
            else []
        ),
        ("DPS global endpoint", f"{emu.global_endpoint} (MQTT/TLS 8883)"),
        ("DPS ID scope", emu.id_scope),
        ("DPS service connection string", emu.dps_connection_string),
    ]
    for host in emu.hub_hosts:
        facts.append((f"IoT hub {host}", emu.hub_connection_string(host)))
    facts += [(f"metrics: {name} (Prometheus)", url) for name, url in stack.config.metrics_urls().items()]
    facts.append(("factory CRL (named in every certificate)", stack.config.crl_url))
    config = stack.config
    if config.replicas > 1:
        for name, port in (("factory_svc", config.factory_port), ("activation_svc", config.activation_port)):
            facts += [
                (f"{name} replica {n} (pid {stack.pid(name.split('_')[0] + f'-{n}')})",
                 f"{config.service_host}:{port + 1000 * n}")
                for n in range(1, config.replicas + 1)
            ]
        if config.group:
            facts += [
                (f"allocation webhook replica {n}", config.webhook_url_of(n))
                for n in range(1, config.replicas + 1)
            ]
        facts += [(f"PostgreSQL: {name}'s state", url) for name, url in stack.database_urls.items()]
        facts.append(("PostgreSQL cluster (kept; --fresh wipes it)", str(stack.database_directory)))
    facts += [
        ("emulator CA (DPS, hubs)", str(emu.ca_path)),
        ("services' TLS CA", str(stack.tls.ca)),
        *(
            (f"party urn:devprov:{role}:{tenant}", f"{stack.tls.cert(name)} ({users})")
            for name, (role, tenant, users) in PARTIES.items()
        ),
        ("logs", str(stack.logs)),
    ]
    return facts


def _print_facts(console: Console, stack: Stack) -> None:
    width = max(len(k) for k, _ in _stack_facts(stack))
    for key, value in _stack_facts(stack):
        console.print(f"  [bold]{key:<{width}}[/]  {value}", highlight=False, soft_wrap=True)


def _claim(console: Console, stack: Stack, args: argparse.Namespace) -> bool:
    """The work directory's lock, before anything is written under it: a second stack on the same directory
    (``up`` or ``run``) is refused at once and touches nothing."""
    try:
        stack.claim(args.command_line)
    except RuntimeError as exc:  # StackRunning, or a directory that is not a stack's
        console.print(f"[red]refused:[/] {exc}", highlight=False, soft_wrap=True)
        return False
    return True


async def _start(console: Console, stack: Stack, *, fresh: bool) -> None:
    with console.status("starting the emulator, factory_svc and activation_svc ..."):
        await asyncio.to_thread(stack.start, fresh=fresh)
    console.print("[green]stack up[/] (loopback, TLS)")
    _print_facts(console, stack)


class UntilRenewed:
    """``--until-renewed``: done once every device has renewed its certificate and sent ``AFTER`` more
    messages acknowledged on the new one."""

    AFTER = 3

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._sent_at_renewal: dict[str, int] = {}

    def __call__(self) -> bool:
        for track in self._fleet.tracks:
            snap = track.snapshot
            if snap.renewals and track.guid not in self._sent_at_renewal:
                self._sent_at_renewal[track.guid] = snap.telemetry_sent
        return all(
            track.guid in self._sent_at_renewal
            and track.snapshot.telemetry_sent >= self._sent_at_renewal[track.guid] + self.AFTER
            for track in self._fleet.tracks
        )


async def _watch(
    console: Console,
    fleet: Fleet,
    watch: HubWatch,
    stop: asyncio.Event,
    seconds: float | None,
    done: UntilRenewed | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds

    def remaining() -> float | None:
        return None if deadline is None else deadline - loop.time()

    renewals = RenewalWatch()

    async def tick() -> bool:
        left = remaining()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25 if left is None else max(0.0, min(0.25, left)))
        await watch.poll()
        events = len(renewals.events)
        renewals.observe(fleet.tracks)
        if not console.is_terminal:  # a log: each renewal as a line of its own
            for event in list(renewals.events)[events:]:
                console.print(event, highlight=False, soft_wrap=True)
        left = remaining()
        finished = done is not None and done()
        return not stop.is_set() and not finished and (left is None or left > 0)

    def view() -> RenderableType:  # the terminal's width now: a resized window gets a fitting table
        return live_view(fleet.tracks, watch, countdown(remaining()), console.width, renewals)

    if console.is_terminal:
        with Live(view(), console=console, refresh_per_second=4) as live:
            while await tick():
                live.update(view())
            live.update(view())
        return
    console.print(LEGEND, markup=False, highlight=False)  # once: what the two counts mean
    next_status = loop.time()
    while await tick():
        if loop.time() >= next_status:
            next_status = loop.time() + STATUS_EVERY_S
            line = status_line(fleet.tracks, watch.received, console.width)
            console.print(line, markup=False, highlight=False, soft_wrap=True)


def _short_certificates(source: SettingsSource) -> ShortCertificates | None:
    """``--cert-minutes`` (and ``--renew-fraction``), checked (``ValueError``); None without them."""
    if source.value("cert_minutes") is None:
        if source.value("renew_fraction") is not None or source.flag("until_renewed", False):
            raise ValueError("--renew-fraction and --until-renewed go with --cert-minutes")
        return None
    minutes = source.integer("cert_minutes", 0)
    fraction = source.number("renew_fraction", ShortCertificates.fraction)
    if minutes < 1 or not 0.01 <= fraction <= 1:
        raise ValueError("--cert-minutes must be at least 1 and --renew-fraction within 0.01..1")
    return ShortCertificates(minutes, fraction)


async def run_demo(args: argparse.Namespace, source: SettingsSource, console: Console) -> int:
    devices, interval = source.integer("devices", 5), source.number("interval", 5.0)
    seconds = None if source.value("seconds") is None else source.number("seconds", 0.0)
    if devices < 1 or interval <= 0 or (seconds is not None and seconds <= 0):
        console.print("[red]--devices, --interval and --seconds must be positive[/]")
        return EXIT_FAILED
    try:
        short = _short_certificates(source)
        stack = Stack(_config(source, short))
    except ValueError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        return EXIT_FAILED
    if not _claim(console, stack, args):
        return EXIT_FAILED
    received: list[int] = []
    stop = _stop_event(received)
    fleet: Fleet | None = None
    watch: HubWatch | None = None
    try:
        await _start(console, stack, fresh=True)
        _log_to_file(stack.logs / "devices.log")
        if stop.is_set():
            return _ended(received, EXIT_INCOMPLETE)
        lifetime = "" if short is None else f", certificates valid {short.minutes} min"
        with console.status(f"factory: minting and enrolling {devices} devices (disabled{lifetime}) ..."):
            labels = await provision_fleet(stack, devices, short)
        console.print(labels_table(labels))
        if stop.is_set():
            return _ended(received, EXIT_INCOMPLETE)
        with console.status("OEM back office: activating with metadata and a hub ..."):
            chosen = await activate_fleet(stack, labels, interval)
        for label in labels:
            console.print(f"  activated {label.guid} on {chosen[label.guid]}", highlight=False)
        if stop.is_set():
            return _ended(received, EXIT_INCOMPLETE)
        watch = HubWatch(HubFeed(stack.emulator.connection))
        fleet = Fleet(stack, labels)
        with console.status("starting the fleet's worker processes ..."):
            await fleet.start()
        console.print(f"first boot of {len(labels)} devices (logs: {stack.logs / 'devices.log'})")
        until = UntilRenewed(fleet) if short is not None and source.flag("until_renewed", False) else None
        await _watch(console, fleet, watch, stop, seconds, until)
        await fleet.stop()
        await watch.poll()
        result = summary(
            fleet, dict(watch.received), chosen, watch.gaps(), expect_renewal=short is not None
        )
        console.print(summary_table(result, console.width))
        summary_json = source.path("summary_json")
        if summary_json is not None:
            write_json(summary_json, result)
        return _ended(received, EXIT_OK if result["ok"] else EXIT_INCOMPLETE)
    except Exception as exc:  # a failed start or party: say what, leave nothing running
        console.print(f"[red]demo failed:[/] {type(exc).__name__}: {exc}", highlight=False)
        return EXIT_FAILED
    finally:
        if fleet is not None:
            await fleet.stop()
        if watch is not None:
            await watch.close()
        with console.status("stopping ..."):
            await asyncio.to_thread(stack.stop)
        console.print(f"stopped; state and logs kept in {stack.root}")


def next_example_guid(device_root: Path) -> str:
    """The first of the README's example ids (...0001, ...0002, ...) with no device state under
    ``device_root`` yet: a stack kept from an earlier ``up`` has provisioned ...0001 already, and provisioning
    it again is IDENTITY_EXISTS."""
    n = 1
    while (device_root / f"{EXAMPLE_GUID_PREFIX}{n:012d}").exists():
        n += 1
    return f"{EXAMPLE_GUID_PREFIX}{n:012d}"


async def _watch_parts(console: Console, stack: Stack, stop: asyncio.Event) -> None:
    """Until ``stop``: say so when a part of the stack dies (a killed replica: the others carry on)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), WATCH_EVERY_S)
        for line in stack.deaths():
            console.print(f"[red]{line}[/]", highlight=False, soft_wrap=True)


async def run_up(args: argparse.Namespace, source: SettingsSource, console: Console) -> int:
    try:
        stack = Stack(_config(source))
    except ValueError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        return EXIT_FAILED
    if not _claim(console, stack, args):
        return EXIT_FAILED
    received: list[int] = []
    stop = _stop_event(received)
    try:
        await _start(console, stack, fresh=args.fresh)
        env_file = stack.write_env_file()
        sample = stack.root / "sample-metadata.json"
        sample.write_text(json.dumps(sample_metadata(), indent=2) + "\n")
        hub = stack.emulator.hub_hosts[-1]
        guid = next_example_guid(stack.device_root)
        console.print(
            "\nDrive it by hand, in another terminal:\n"
            f"  source {env_file}\n"
            "  # 1. factory: mint + enroll (disabled); note the activation code it prints\n"
            f"  device-client provision {guid}\n"
            "  # 2. OEM: activate with metadata and a hub (asks for the code)\n"
            f"  #    (or in the browser: {stack.config.portal_url})\n"
            f"  activation-svc activate {guid} "
            f"--metadata {sample} --hub {hub}\n"
            "  # 3. first boot: DPS, the hub, telemetry every 5 s (Ctrl-C stops it)\n"
            f"  device-client run {guid}\n"
            "  # watch the hubs: iot-emulator monitor\n"
            "\nUp. Ctrl-C stops the stack.",
            highlight=False,
            soft_wrap=True,
        )
        await _watch_parts(console, stack, stop)
        return _ended(received, EXIT_OK)
    except Exception as exc:
        console.print(f"[red]could not start the stack:[/] {type(exc).__name__}: {exc}", highlight=False)
        return EXIT_FAILED
    finally:
        with console.status("stopping ..."):
            await asyncio.to_thread(stack.stop)
        console.print("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(words)
    args.command_line = shlex.join(["devprov-demo", *words])  # named by a second stack's refusal
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough for a GUID and its columns
        console = Console(width=120)
    handler = run_demo if args.command == "run" else run_up
    return run_cli(lambda: asyncio.run(handler(args, _settings(args), console)), prog="devprov-demo")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
