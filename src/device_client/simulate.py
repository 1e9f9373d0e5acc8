"""``device-client simulate``: a fleet of simulated devices booting at once (see :mod:`device_client.fleet`).

    device-client simulate --devices 500            # provision 500 devices, boot them, watch, Ctrl-C stops
    device-client simulate --existing --seconds 60  # the devices already under --state-root, for a minute

New devices are minted and enrolled at the factory (``EnrollBatch``, ``--batch-size`` per call) with a
progress bar; enrollments are created disabled, so they register once their OEM has activated them
(``--labels`` writes the one-time activation codes for that).  Exit 0 when every device registered and had
its first telemetry acknowledged, 1 otherwise, 130 on Ctrl-C before the fleet booted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from device_client.batch import provision_batches
from device_client.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, Reason, UsageError
from device_client.fleet import FleetRunner, default_workers
from device_client.fleet_view import live_summary, report_table
from device_client.settings import Settings
from device_client.state import IDENTITY_FILE, atomic_write
from mainkit.shell import print_json

STATUS_EVERY_S = 5.0


def runtime_overrides(settings: Settings, spread_s: float) -> dict[str, Any]:
    """The settings a worker's devices get on top of their own settings.toml (workers read no env)."""
    cloud, rt = settings.cloud, settings.runtime
    values: dict[str, Any] = {
        "id_scope": cloud.id_scope,
        "global_endpoint": cloud.global_endpoint,
        "trusted_ca_file": str(cloud.trusted_ca_file) if cloud.trusted_ca_file else None,
        "telemetry_interval_s": rt.telemetry_interval_s,
        "buffer_max_messages": rt.buffer_max_messages,
        "backoff_initial_s": rt.backoff_initial_s,
        "backoff_max_s": rt.backoff_max_s,
        "sdk_timeout_s": rt.sdk_timeout_s,
        "give_up_after_s": rt.give_up_after_s,
        "first_attempt_window_s": spread_s,
    }
    return {k: v for k, v in values.items() if v is not None}


def existing_devices(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / IDENTITY_FILE).is_file())


async def _provision(
    console: Console, guids: list[str], settings: Settings, args: argparse.Namespace
) -> None:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=not console.is_terminal) as progress:
        minted = progress.add_task("factory: minted", total=len(guids))
        enrolled = progress.add_task("factory: enrolled (EnrollBatch)", total=len(guids))

        def tell(phase: str, done: int) -> None:
            progress.update(minted if phase == "minted" else enrolled, completed=done)

        results = await provision_batches(guids, settings, batch_size=args.batch_size, progress=tell)
    refused = [r for r in results if r.error]
    for r in refused[:5]:
        console.print(f"[red]enrollment refused[/] {r.guid}: {r.error}", highlight=False)
    if args.labels:
        labels = [{"guid": r.guid, "activation_code": r.activation_code} for r in results if not r.error]
        atomic_write(args.labels, json.dumps(labels, indent=2).encode(), mode=0o600)
        console.print(f"labels (one-time activation codes) written to {args.labels}")


async def _watch(
    console: Console, runner: FleetRunner, args: argparse.Namespace, stop: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()

    def done() -> bool:
        elapsed = loop.time() - started
        return (
            stop.is_set()
            or (args.seconds is not None and elapsed >= args.seconds)
            or (args.until_telemetry and runner.all_acknowledged())
            or len(runner.lost) == len(runner.workers)
        )

    def footer() -> str:
        elapsed = loop.time() - started
        left = "" if args.seconds is None else f", {max(0.0, args.seconds - elapsed):.0f} s left"
        return f"{elapsed:.0f} s since boot{left}; Ctrl-C stops every worker"

    async def tick() -> None:
        runner.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)

    if console.is_terminal:
        view = live_summary(runner, footer(), console.width)
        with Live(view, console=console, refresh_per_second=4) as live:
            while not done():
                await tick()
                live.update(live_summary(runner, footer(), console.width))
        return
    next_line = 0.0
    while not done():
        await tick()
        if loop.time() >= next_line:
            next_line = loop.time() + STATUS_EVERY_S
            counts = ", ".join(f"{k} {v}" for k, v in runner.counts().items())
            console.print(f"status: {counts}", highlight=False)


async def _simulate(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    root = settings.state_root
    if args.existing:
        guids = existing_devices(root)
        if not guids:
            raise UsageError(f"no device state directories under {root}", Reason.NO_DEVICES)
    else:
        guids = [str(uuid.uuid4()) for _ in range(args.devices)]
        await _provision(console, guids, settings, args)
    if stop.is_set():
        return EXIT_INTERRUPTED
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    runner = FleetRunner(
        guids,
        root,
        runtime_overrides(settings, args.spread),
        workers=args.workers or default_workers(len(guids)),
        log_dir=root.parent / "fleet-logs" / stamp,
    )
    try:
        with console.status(f"starting {len(runner.workers)} worker processes ..."):
            await runner.start()
        runner.go()
        console.print(f"{len(guids)} devices booted at {time.strftime('%H:%M:%S')} (logs: {runner.log_dir})")
        await _watch(console, runner, args, stop)
    finally:
        with console.status("stopping every worker ..."):
            await runner.stop()
    report = runner.report()
    if args.json:
        print_json(report)
    else:
        console.print(report_table(report, console.width))
    return EXIT_OK if report["ok"] else EXIT_FAILURE


def simulate(args: argparse.Namespace, settings: Settings) -> int:
    if args.existing == (args.devices is not None):
        raise UsageError("give either --devices N or --existing", "USAGE")
    if (args.devices is not None and args.devices < 1) or (args.workers is not None and args.workers < 1):
        raise UsageError("--devices and --workers must be at least 1", "USAGE")
    # With --json the report owns stdout; the live view goes to stderr.
    terminal = os.isatty(2 if args.json else 1)
    console = Console(stderr=args.json) if terminal else Console(width=120, stderr=args.json)
    return asyncio.run(_simulate(args, settings, console))
