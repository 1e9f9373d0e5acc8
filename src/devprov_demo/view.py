"""What the demo shows: the labels, a live table of the fleet, a tail of what the hubs receive, a summary."""

from __future__ import annotations

import json
from collections import Counter, deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from azure_iot_emulator.hub.telemetry import StoredMessage, TelemetryStore
from azure_iot_emulator.store import Database
from device_client.runtime import DeviceState
from devprov_demo.fleet import DeviceTrack, Label

STATE_STYLE = {
    DeviceState.IDLE: "dim",
    DeviceState.REGISTERING: "yellow",
    DeviceState.WAITING_FOR_ACTIVATION: "magenta",
    DeviceState.REGISTERED: "cyan",
    DeviceState.CONNECTED: "green",
    DeviceState.SENDING: "bold green",
    DeviceState.STOPPED: "dim",
    DeviceState.FAILED: "bold red",
}


class HubWatch:
    """Tails the telemetry the emulator's hubs have stored (its SQLite file, read beside the server, as
    ``iot-emulator monitor`` does) and counts it per device."""

    def __init__(self, emulator_data_dir: Path, keep: int = 8) -> None:
        self._db = Database(emulator_data_dir / "emulator.db")
        self._store = TelemetryStore(self._db, lambda: datetime.now(UTC))
        self._cursor = 0
        self.received: Counter[str] = Counter()
        self.tail: deque[StoredMessage] = deque(maxlen=keep)

    def poll(self) -> None:
        while batch := self._store.after(self._cursor):
            for message in batch:
                self.received[message.device_id] += 1
                self.tail.append(message)
            self._cursor = batch[-1].seq

    def close(self) -> None:
        self._db.close()


def labels_table(labels: list[Label]) -> Table:
    title = "Labels printed at the factory (GUID + one-time activation code)"
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("hardware GUID = registration id = device id")
    table.add_column("activation code", style="bold")
    for index, label in enumerate(labels, 1):
        table.add_row(str(index), label.guid, label.activation_code)
    return table


def _reading(body: Any) -> str:
    if not body:
        return ""
    if not isinstance(body, dict):
        return json.dumps(body)[:80]
    readings = body.get("readings")
    if isinstance(readings, dict):
        shown = ", ".join(f"{k}={v}" for k, v in list(readings.items())[:3])
    else:
        shown = json.dumps(body, sort_keys=True)[:60]
    return f"#{body.get('seq', '?')} {shown}"


def fleet_table(tracks: list[DeviceTrack], received: Counter[str]) -> Table:
    table = Table(title="Devices in the field", title_justify="left", expand=True)
    table.add_column("device", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("hub", no_wrap=True)
    table.add_column("sent", justify="right")
    table.add_column("hub got", justify="right")
    table.add_column("last message", overflow="ellipsis", no_wrap=True)
    for track in tracks:
        snap = track.snapshot
        state = Text(snap.state.value, style=STATE_STYLE.get(snap.state, ""))
        last = _reading(snap.last_message) or (track.error or "")
        table.add_row(
            track.label.guid,
            state,
            snap.assigned_hub or "-",
            str(snap.telemetry_sent),
            str(received.get(track.label.guid, 0)),
            last,
        )
    return table


def telemetry_panel(tail: deque[StoredMessage]) -> Panel:
    lines = Text()
    for message in tail:
        text = message.body_text()
        try:
            shown = _reading(json.loads(text)) if text else f"<{len(message.body)} bytes>"
        except ValueError:
            shown = text[:80]
        lines.append(f"\n{message.enqueued_time[11:23]} ", style="dim")
        lines.append(f"{message.hub} ", style="cyan")
        lines.append(f"{message.device_id} ", style="bold")
        lines.append(shown)
    body = lines[1:] if lines else Text("(nothing received yet)", style="dim")
    return Panel(body, title="IoT hubs receive (newest last)", expand=True)


def live_view(tracks: list[DeviceTrack], watch: HubWatch, footer: str) -> RenderableType:
    return Group(fleet_table(tracks, watch.received), telemetry_panel(watch.tail), Text(footer, style="dim"))


def summary_table(summary: dict[str, Any]) -> Table:
    verdict = "every device registered and its hub received telemetry" if summary["ok"] else "INCOMPLETE"
    table = Table(title=f"Summary: {verdict}", title_justify="left")
    table.add_column("device", no_wrap=True)
    table.add_column("hub", no_wrap=True)
    table.add_column("registered")
    table.add_column("acked", justify="right")
    table.add_column("hub got", justify="right")
    errors = any(device["error"] for device in summary["devices"])
    if errors:
        table.add_column("error")
    for device in summary["devices"]:
        registered = DeviceState.REGISTERED.value in device["states_reached"]
        row: list[RenderableType] = [
            device["guid"],
            device["assigned_hub"] or "-",
            Text("yes", style="green") if registered else Text("no", style="red"),
            str(device["telemetry_acknowledged"]),
            str(device["hub_received"]),
        ]
        if errors:
            row.append(device["error"] or "")
        table.add_row(*row)
    return table
