"""What the demo shows: the labels, a live table of the fleet, a tail of what the hubs receive, a summary."""

from __future__ import annotations

import json
import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Protocol

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

import jsonsafe
from device_client import renewal
from device_client.runtime import DeviceState, RuntimeSnapshot
from devprov_demo.fleet import FleetSummary, Label
from devprov_demo.hub_feed import HubFeed, ReceivedMessage

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
    """Tails the telemetry the emulator's hubs received (from their built-in endpoints: ``hub_feed``) and
    counts it per device: each
    message once.  A device numbers its messages from 1 (``seq``, across runs and certificate renewals) and
    sends a message again, same number, when its acknowledgement was lost (a reconnect): the hub then
    stores it twice, and ``received`` still counts it once (``resent`` counts the second copies).  A
    message without a number (another client's) counts as it comes."""

    def __init__(self, feed: HubFeed | None, keep: int = 8) -> None:
        self._feed = feed
        self.received: Counter[str] = Counter()  # distinct messages per device
        self.resent: Counter[str] = Counter()  # copies of a message the hub already had
        self.tail: deque[ReceivedMessage] = deque(maxlen=keep)
        self._seqs: dict[str, set[int]] = {}

    def take(self, messages: Iterable[ReceivedMessage]) -> None:
        for message in messages:
            self.tail.append(message)
            seq = _seq(message)
            if seq is None:
                self.received[message.device_id] += 1
                continue
            seen = self._seqs.setdefault(message.device_id, set())
            if seq in seen:
                self.resent[message.device_id] += 1
                continue
            seen.add(seq)
            self.received[message.device_id] += 1

    async def poll(self) -> None:
        if self._feed is not None:
            self.take(await self._feed.read_new())

    def gaps(self) -> dict[str, int]:
        """Per device: how many sequence numbers below the highest received the hubs never got."""
        return {device: max(seqs) - len(seqs) for device, seqs in self._seqs.items()}

    async def close(self) -> None:
        if self._feed is not None:
            await self._feed.close()


def _seq(message: ReceivedMessage) -> int | None:
    try:
        body = jsonsafe.loads(message.body_text() or "null")
    except jsonsafe.JsonRefused:
        return None
    seq = body.get("seq") if isinstance(body, dict) else None
    return seq if isinstance(seq, int) and seq > 0 else None


class RenewalWatch:
    """Notices each device's certificate renewals in its runtime's snapshots (the serial in use changes),
    keeping the latest as lines for the live view."""

    def __init__(self, keep: int = 6) -> None:
        self._serials: dict[str, str] = {}
        self.events: deque[Text] = deque(maxlen=keep)

    def observe(self, tracks: Iterable[TrackView], now: datetime | None = None) -> None:
        at = (now or datetime.now(UTC)).strftime("%H:%M:%S")
        for track in tracks:
            snap = track.snapshot
            serial = snap.certificate_serial
            if serial is None:
                continue
            before = self._serials.get(track.guid)
            self._serials[track.guid] = serial
            if before is None or before == serial:
                continue
            line = Text(no_wrap=True, overflow="ellipsis")
            line.append(f"{at} ", style="dim")
            line.append(f"{shorten_middle(track.guid, 17)} ", style="bold")
            line.append("renewed ", style="bold green")
            line.append(f"serial {shorten_middle(before, 11)} -> {shorten_middle(serial, 11)}")
            if snap.certificate_not_after is not None:
                line.append(f", valid until {snap.certificate_not_after:%H:%M:%S} UTC")
            self.events.append(line)


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


def shorten_middle(text: str, width: int) -> str:
    """``ce8b6f4e…bb3fb86a``: both ends of an id stay readable (a GUID is told apart by either end)."""
    if len(text) <= width:
        return text
    head = width // 2
    tail = width - 1 - head
    return f"{text[:head]}…{text[len(text) - tail :]}" if tail > 0 else text[:head] + "…"


class TrackView(Protocol):
    """What the live table needs of a device (``devprov_demo.fleet.DeviceTrack``)."""

    @property
    def guid(self) -> str: ...

    @property
    def snapshot(self) -> RuntimeSnapshot: ...

    @property
    def error(self) -> str | None: ...


@dataclass(frozen=True)
class Layout:
    """How much of each device fits a terminal ``width`` columns wide.  The essential columns (device,
    state, hub, acked, hub got) always show; the GUID and long hub names are shortened in the middle; the
    last message takes what is left, and is left out below ``WITH_LAST_MESSAGE`` columns."""

    width: int
    guid: int
    hub: int
    last_message: bool  # and the certificate's column, when the devices report one

    WIDE: ClassVar[int] = 120
    WITH_LAST_MESSAGE: ClassVar[int] = 100

    @classmethod
    def for_width(cls, width: int) -> Layout:
        if width >= cls.WIDE:
            return cls(width, guid=36, hub=30, last_message=True)
        if width >= cls.WITH_LAST_MESSAGE:
            return cls(width, guid=17, hub=20, last_message=True)
        return cls(width, guid=17 if width >= 80 else 13, hub=15, last_message=False)


# Shorter words for the narrow layout; the wide one shows the runtime's own names.
_NARROW_STATE = {DeviceState.WAITING_FOR_ACTIVATION: "WAITING"}


_RENEWING = (renewal.REQUESTED, renewal.RECEIVED, renewal.REGISTERED, renewal.PROMOTED)


def _left(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds <= 0:
        return "expired"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s left"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h left"
    return f"{seconds // 86400}d left"


def certificate_cell(snap: RuntimeSnapshot, now: datetime | None = None) -> Text:
    """The certificate in use: time left, and its renewal (in progress, refused, how many this run)."""
    if snap.certificate_not_after is None:
        return Text("-")
    text = Text(_left(snap.certificate_not_after - (now or datetime.now(UTC))), no_wrap=True)
    if snap.renewal_state in _RENEWING:
        text.append(f" renewing ({snap.renewal_state})", style="bold yellow")
    elif snap.renewal_state in (renewal.REFUSED, renewal.FAILED):
        text.append(f" renewal {snap.renewal_state}", style="bold red")
    if snap.renewals:
        text.append(f" renewed {snap.renewals}x", style="bold green")
    return text


# The two counts, said once for the live table, the summary and the log lines.  Both count messages: the
# device's acknowledged sends, the hub's stored messages each once.  The device's count comes a moment
# later (its worker reports twice a second), so the hub may be ahead by the messages in between.
ACKED = "acked"
HUB_GOT = "hub got"
LEGEND = (
    f"{ACKED}: messages the hub acknowledged to the device · {HUB_GOT}: messages the hub stored, each "
    "once (one sent again counts once); it may lead while an acknowledgement is on its way"
)


def fleet_table(tracks: Sequence[TrackView], received: Mapping[str, int], layout: Layout) -> Table:
    table = Table(
        title="Devices in the field",
        title_justify="left",
        expand=True,
        caption=LEGEND,
        caption_justify="left",
    )
    certificates = layout.last_message and any(t.snapshot.certificate_not_after for t in tracks)
    table.add_column("device", no_wrap=True, min_width=layout.guid)
    table.add_column("state", no_wrap=True, min_width=len("CONNECTED"))
    table.add_column("hub", no_wrap=True, min_width=3)
    table.add_column(ACKED, justify="right", no_wrap=True, min_width=len(ACKED))
    table.add_column(HUB_GOT, justify="right", no_wrap=True, min_width=len(HUB_GOT))
    if layout.last_message:
        table.add_column("last message", overflow="ellipsis", no_wrap=True, ratio=1)
    if certificates:
        width = len("2m04s left renewed 1x")
        table.add_column("certificate", no_wrap=True, overflow="ellipsis", min_width=width)
    for track in tracks:
        snap = track.snapshot
        name = snap.state.value if layout.width >= Layout.WIDE else _NARROW_STATE.get(snap.state, snap.state)
        row: list[RenderableType] = [
            shorten_middle(track.guid, layout.guid),
            Text(str(name), style=STATE_STYLE.get(snap.state, "")),
            shorten_middle(snap.assigned_hub or "-", layout.hub),
            str(snap.telemetry_sent),
            str(received.get(track.guid, 0)),
        ]
        if layout.last_message:
            row.append(_reading(snap.last_message) or (track.error or ""))
        if certificates:
            row.append(certificate_cell(snap))
        table.add_row(*row)
    return table


def telemetry_panel(tail: Iterable[ReceivedMessage], layout: Layout) -> Panel:
    lines: list[Text] = []
    for message in tail:
        text = message.body_text()
        if not text:
            shown = f"<{len(message.body)} bytes>"
        else:
            try:
                shown = _reading(jsonsafe.loads(text))
            except jsonsafe.JsonRefused:
                shown = text[:80]
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(f"{message.enqueued_time[11:23]} ", style="dim")
        line.append(f"{shorten_middle(message.hub, layout.hub)} ", style="cyan")
        line.append(f"{shorten_middle(message.device_id, layout.guid)} ", style="bold")
        line.append(shown)
        lines.append(line)
    body: RenderableType = Group(*lines) if lines else Text("(nothing received yet)", style="dim")
    return Panel(body, title="IoT hubs receive (newest last)", expand=True)


def countdown(remaining_s: float | None) -> str:
    """The footer: what stops the view, and when."""
    if remaining_s is None:
        return "Ctrl-C stops everything"
    return f"stops in {max(0, math.ceil(remaining_s))} s (Ctrl-C stops now)"


def renewals_panel(events: Iterable[Text]) -> Panel:
    return Panel(Group(*events), title="Certificates renewed (EST, newest last)", expand=True)


def live_view(
    tracks: Sequence[TrackView],
    watch: HubWatch,
    footer: str,
    width: int,
    renewals: RenewalWatch | None = None,
) -> RenderableType:
    layout = Layout.for_width(width)
    parts: list[RenderableType] = [
        fleet_table(tracks, watch.received, layout),
        telemetry_panel(watch.tail, layout),
    ]
    if renewals is not None and renewals.events:
        parts.append(renewals_panel(renewals.events))
    parts.append(Text(footer, style="dim"))
    return Group(*parts)


def summary_table(summary: FleetSummary, width: int = Layout.WIDE) -> Table:
    layout = Layout.for_width(width)
    verdict = "every device registered and its hub received telemetry" if summary["ok"] else "INCOMPLETE"
    expect_renewal = summary.get("expect_renewal", False)
    if summary["ok"] and expect_renewal:
        verdict = "every device renewed its certificate, its hub received telemetry with no gap"
    renewed = summary.get("renewals", 0)
    if renewed or expect_renewal:
        verdict += f"; {renewed} certificate renewal{'' if renewed == 1 else 's'}"
    table = Table(title=f"Summary: {verdict}", title_justify="left", caption=LEGEND, caption_justify="left")
    table.add_column("device", no_wrap=True, min_width=layout.guid)
    table.add_column("hub", no_wrap=True)
    table.add_column("registered", no_wrap=True, min_width=len("registered"))
    table.add_column(ACKED, justify="right", no_wrap=True)
    table.add_column(HUB_GOT, justify="right", no_wrap=True, min_width=len(HUB_GOT))
    if renewed or expect_renewal:
        table.add_column("renewed", justify="right", no_wrap=True)
        table.add_column("gaps", justify="right", no_wrap=True)
    errors = any(device["error"] for device in summary["devices"])
    if errors:
        table.add_column("error")
    for device in summary["devices"]:
        registered = DeviceState.REGISTERED.value in device["states_reached"]
        row: list[RenderableType] = [
            shorten_middle(device["guid"], layout.guid),
            shorten_middle(device["assigned_hub"] or "-", layout.hub),
            Text("yes", style="green") if registered else Text("no", style="red"),
            str(device["telemetry_acknowledged"]),
            str(device["hub_received"]),
        ]
        if renewed or expect_renewal:
            gaps = device.get("telemetry_gaps", 0)
            row += [str(device.get("renewals", 0)), Text(str(gaps), style="red" if gaps else "")]
        if errors:
            row.append(device["error"] or "")
        table.add_row(*row)
    return table


def status_line(
    tracks: Sequence[TrackView], received: Mapping[str, int], width: int, now: datetime | None = None
) -> str:
    """Off a terminal (a log, a pipe), every few seconds: the fleet in one line of at most ``width``
    characters however many devices there are: how many are in each state, the two counts summed, and the
    devices with nothing acknowledged yet (as many as fit, then how many more)."""
    at = (now or datetime.now(UTC)).strftime("%H:%M:%S")
    states = Counter(track.snapshot.state.value for track in tracks)
    by_state = ", ".join(f"{count} {state}" for state, count in sorted(states.items(), key=lambda s: -s[1]))
    acked = sum(track.snapshot.telemetry_sent for track in tracks)
    got = sum(received.get(track.guid, 0) for track in tracks)
    line = f"{at} {len(tracks)} devices: {by_state}; {ACKED} {acked}, {HUB_GOT} {got}"
    waiting = [track.guid[:8] for track in tracks if track.snapshot.telemetry_sent == 0]
    if waiting:
        line += f"; not sending yet ({len(waiting)}):"
        for index, short in enumerate(waiting):
            left_after = len(waiting) - index - 1  # room is kept for saying how many more
            reserve = len(f" +{left_after} more") if left_after else 0
            if len(line) + 1 + len(short) + reserve > width:
                line += f" +{len(waiting) - index} more"
                break
            line += " " + short
    return line if len(line) <= width else line[: width - 1] + "…"
