"""What a person sees of a simulated fleet: a live summary that fits the terminal, and the final report."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from device_client.fleet import FleetRunner

# (count key, heading, style), in the order a device goes through them
COLUMNS = (
    ("registered", "registered", "cyan"),
    ("connected", "connected", "green"),
    ("sending", "sending", "bold green"),
    ("telemetry_acknowledged", "telemetry ack'd", "bold green"),
    ("backing_off", "backing off", "yellow"),
    ("failed", "failed", "bold red"),
)
NARROW = 90  # below this many columns the summary is one row per count


def _bar(done: int, total: int, width: int) -> str:
    filled = 0 if total == 0 else round(width * done / total)
    return "█" * filled + "·" * (width - filled)


def live_summary(runner: FleetRunner, footer: str, width: int) -> RenderableType:
    counts = runner.counts()
    total = counts["devices"]
    title = f"{total} simulated devices in {len(runner.workers)} worker processes"
    if width < NARROW:
        table = Table(title=title, title_justify="left", show_header=False, expand=False)
        table.add_column("what")
        table.add_column("n", justify="right")
        table.add_column("bar", no_wrap=True)
        bar = max(4, width - 32)
        for key, heading, style in COLUMNS:
            table.add_row(heading, Text(str(counts[key]), style=style), _bar(counts[key], total, bar))
    else:
        table = Table(title=title, title_justify="left")
        for _key, heading, style in COLUMNS:
            table.add_column(heading, justify="right", style=style)
        table.add_row(*(str(counts[key]) for key, _h, _s in COLUMNS))
        table.add_row(*(_bar(counts[key], total, min(14, len(h) + 2)) for key, h, _s in COLUMNS))
    lines: list[RenderableType] = [table]
    lines += [Text(f"! {lost}", style="bold red") for lost in runner.lost]
    lines.append(Text(footer, style="dim"))
    return Group(*lines)


def report_table(report: dict[str, Any], width: int) -> RenderableType:
    counts = report["counts"]
    table = Table(title="fleet report", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("devices / workers", f"{counts['devices']} / {report['workers']}")
    for key, heading, _style in COLUMNS:
        table.add_row(heading, str(counts[key]))
    timings = (("registered_s", "registered after"), ("first_telemetry_s", "first telemetry after"))
    for key, heading in timings:
        s = report[key]
        value = "-" if s["p50"] is None else f"p50 {s['p50']} s  p95 {s['p95']} s  max {s['max']} s"
        table.add_row(heading, value)
    for lost in report["lost_workers"]:
        table.add_row(Text("lost", style="bold red"), lost)
    shown = max(3, min(10, width // 20))
    for item in report["failed"][:shown]:
        what = f"{item['state']}: {item['error'] or 'no telemetry'}"
        table.add_row(Text(item["guid"][:13], style="red"), what)
    if len(report["failed"]) > shown:
        table.add_row("...", f"{len(report['failed']) - shown} more without telemetry (see --json)")
    table.add_row("result", Text("ok", style="green") if report["ok"] else Text("incomplete", style="red"))
    return table
