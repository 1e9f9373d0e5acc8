"""The demo's live view as a person's terminal shows it: rendered by rich's recording console at 80, 120
and 200 columns, every essential column is there, whole, for every device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from rich.console import Console

from device_client.runtime import DeviceState, RuntimeSnapshot
from devprov_demo.hub_feed import ReceivedMessage
from devprov_demo.view import (
    HubWatch,
    RenewalWatch,
    countdown,
    live_view,
    shorten_middle,
    status_line,
    summary_table,
)

GUIDS = (
    "ce8b6f4e-410e-499d-812a-bb3fb86a0c11",
    "0d3c2b1a-9f8e-4d7c-a6b5-c4d3e2f1a0b9",
    "7e6d5c4b-3a29-4180-9f7e-6d5c4b3a2910",
)


@dataclass(frozen=True)
class Track:
    guid: str
    snapshot: RuntimeSnapshot
    error: str | None = None


def _tracks() -> list[Track]:
    states = (DeviceState.SENDING, DeviceState.WAITING_FOR_ACTIVATION, DeviceState.CONNECTED)
    tracks = []
    for index, (guid, state) in enumerate(zip(GUIDS, states, strict=True)):
        sent = 1000 + index
        body = {"seq": sent, "readings": {"temperatureC": 21.5, "humidityPct": 40.1, "supplyVoltageV": 23.9}}
        snapshot = RuntimeSnapshot(
            guid=guid,
            state=state,
            assigned_hub=f"127.0.0.{2 + index % 2}",
            telemetry_sent=sent,
            last_message=body,
        )
        tracks.append(Track(guid, snapshot))
    return tracks


@pytest.fixture
def watch():
    """A message from each device as the hubs' REST API returns them, taken by HubWatch."""
    hub_watch = HubWatch(None)
    seq = 0
    for index, guid in enumerate(GUIDS):
        for n in range(1, 4):
            seq += 1
            body = json.dumps({"seq": n, "readings": {"temperatureC": 20 + index}}).encode()
            enqueued = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
            hub_watch.take([ReceivedMessage(seq, f"127.0.0.{2 + index % 2}", guid, enqueued, body)])
    return hub_watch


def _render(width: int, watch: HubWatch, footer: str = "stops in 40 s (Ctrl-C stops now)") -> list[str]:
    console = Console(record=True, width=width, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(live_view(_tracks(), watch, footer, width))
    console.file.close()
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 120, 200])
def test_every_essential_column_shows_whole_at_each_width(width: int, watch: HubWatch) -> None:
    lines = _render(width, watch)
    assert all(len(line) <= width for line in lines)
    header = next(line for line in lines if "device" in line and "state" in line)
    for column in ("device", "state", "hub", "acked", "hub got"):
        assert column in header, (width, column)
    assert "sent" not in header  # one word for the device's count, live and in the summary
    legend = " ".join(line.strip() for line in lines)
    assert "acked: messages the hub acknowledged to the device" in legend
    assert ("last message" in header) is (width >= 100)
    for track in _tracks():
        shown_id = track.guid if width >= 120 else shorten_middle(track.guid, 17)
        row = next(line for line in lines if shown_id in line and "127.0.0." in line and "│" in line)
        cells = [cell.strip() for cell in row.strip("│").split("│")]
        assert cells[0] == shown_id
        assert cells[1] in (track.snapshot.state.value, "WAITING")
        assert cells[2] == track.snapshot.assigned_hub
        assert cells[3] == str(track.snapshot.telemetry_sent)
        assert cells[4] == "3"  # what the hub's store holds for it
        if width >= 100:  # the last message takes what is left, cut with an ellipsis
            assert cells[5].startswith(f"#{track.snapshot.telemetry_sent} temp")
        if width >= 200:
            readings = "temperatureC=21.5, humidityPct=40.1, supplyVoltageV=23.9"
            assert cells[5] == f"#{track.snapshot.telemetry_sent} {readings}"
    assert lines[-1].strip() == "stops in 40 s (Ctrl-C stops now)"


def test_a_guid_is_shortened_in_the_middle_not_cut() -> None:
    guid = GUIDS[0]
    assert shorten_middle(guid, 17) == "ce8b6f4e…bb3fb86a0c11"[:8] + "…" + guid[-8:]
    assert shorten_middle(guid, 13) == "ce8b6f…6a0c11"
    assert shorten_middle(guid, 36) == guid
    assert len(shorten_middle(guid, 13)) == 13


def test_the_footer_counts_down() -> None:
    assert countdown(40.0) == "stops in 40 s (Ctrl-C stops now)"
    assert countdown(12.2) == "stops in 13 s (Ctrl-C stops now)"
    assert countdown(-0.1) == "stops in 0 s (Ctrl-C stops now)"
    assert countdown(None) == "Ctrl-C stops everything"


def test_help_is_plain_text() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "devprov_demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "devprov-demo, also python -m devprov_demo (make demo / make up)." in done.stdout
    assert "``" not in done.stdout and "--seconds N runs N seconds" in done.stdout


@pytest.mark.parametrize("width", [80, 120, 200])
def test_the_summary_fits_too(width: int) -> None:
    devices = [
        {
            "guid": guid,
            "assigned_hub": "127.0.0.2",
            "states_reached": ["IDLE", "REGISTERING", "REGISTERED", "CONNECTED"],
            "telemetry_acknowledged": 13,
            "hub_received": 13,
            "error": None,
        }
        for guid in GUIDS
    ]
    console = Console(record=True, width=width, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(summary_table({"ok": True, "devices": devices}, width))
    console.file.close()
    lines = console.export_text().splitlines()
    assert all(len(line) <= width for line in lines)
    header = next(line for line in lines if "device" in line and "┃" in line)
    assert all(column in header for column in ("device", "hub", "registered", "acked", "hub got"))
    assert "hub got: messages the hub stored, each once" in " ".join(line.strip() for line in lines)
    for guid in GUIDS:
        shown = guid if width >= 120 else shorten_middle(guid, 17)
        assert any(f"│ {shown} " in line and " yes " in line for line in lines)


def _renewing_tracks(now: datetime) -> list[Track]:
    """The three devices mid-demo with 3-minute certificates: one changing over, one renewed, one waiting."""
    from datetime import timedelta

    states = (("received", 0), ("confirmed", 1), (None, 0))
    tracks = []
    for index, (track, (renewal_state, renewals)) in enumerate(zip(_tracks(), states, strict=True)):
        snapshot = RuntimeSnapshot(
            **{
                **track.snapshot.__dict__,
                "certificate_serial": f"{index + 1:02X}" * 20,
                "certificate_not_after": now + timedelta(minutes=2, seconds=5 + index),
                "renewal_state": renewal_state,
                "renewals": renewals,
            }
        )
        tracks.append(Track(track.guid, snapshot))
    return tracks


@pytest.mark.parametrize("width", [80, 100, 120, 200])
def test_the_certificate_and_its_renewal_show_when_devices_report_them(width: int, watch: HubWatch) -> None:
    now = datetime.now(UTC)
    tracks = _renewing_tracks(now)
    renewals = RenewalWatch()
    renewals.observe(tracks, now)  # first sight: nothing renewed yet
    assert not renewals.events
    renewed = Track(
        tracks[0].guid,
        RuntimeSnapshot(**{**tracks[0].snapshot.__dict__, "certificate_serial": "AB" * 20, "renewals": 1}),
    )
    renewals.observe([renewed, *tracks[1:]], now)
    assert len(renewals.events) == 1
    console = Console(record=True, width=width, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(live_view(tracks, watch, "footer", width, renewals))
    console.file.close()
    lines = console.export_text().splitlines()
    assert all(len(line) <= width for line in lines)
    text = "\n".join(lines)
    assert f"{shorten_middle(tracks[0].guid, 17)} renewed serial 01010…10101 -> ABABA…BABAB" in text
    if width >= 100:  # the certificate's column, beside the last message
        header = next(line for line in lines if "device" in line and "state" in line)
        assert "certificate" in header
        assert "renewing (rec" in text and "renewed 1x" in text
        assert "2m0" in text and "left" in text


def test_the_certificate_cell_says_time_left_and_the_renewal() -> None:
    from datetime import timedelta

    from devprov_demo.view import certificate_cell

    now = datetime.now(UTC)
    snap = RuntimeSnapshot(guid=GUIDS[0], state=DeviceState.SENDING, certificate_not_after=now)
    assert certificate_cell(snap, now).plain == "expired"
    later = RuntimeSnapshot(
        guid=GUIDS[0], state=DeviceState.SENDING, certificate_not_after=now + timedelta(days=364, hours=1),
        renewal_state="refused", renewals=2,
    )  # fmt: skip
    assert certificate_cell(later, now).plain == "364d left renewal refused renewed 2x"
    assert certificate_cell(RuntimeSnapshot(guid=GUIDS[0], state=DeviceState.IDLE), now).plain == "-"


def _message(hub_seq: int, guid: str, seq: int) -> ReceivedMessage:
    body = json.dumps({"seq": seq, "readings": {"temperatureC": 20}}).encode()
    return ReceivedMessage(hub_seq, "127.0.0.2", guid, "2026-01-01T00:00:00.000000Z", body)


def test_a_message_sent_again_after_a_reconnect_counts_once_at_the_hub() -> None:
    """The row that showed "sent 4 / hub got 5": the device's acknowledgement of #3 was lost with its
    connection, so it sent #3 again (same number) and the hub stored it twice."""
    guid = GUIDS[0]
    watch = HubWatch(None)
    watch.take([_message(n, guid, seq) for n, seq in enumerate((1, 2, 3, 3, 4), 1)])
    assert watch.received[guid] == 4  # as many as the device saw acknowledged
    assert watch.resent[guid] == 1
    assert watch.gaps() == {guid: 0}
    snapshot = RuntimeSnapshot(
        guid=guid, state=DeviceState.SENDING, assigned_hub="127.0.0.2", telemetry_sent=4
    )
    console = Console(record=True, width=120, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(live_view([Track(guid, snapshot)], watch, "footer", 120))
    console.file.close()
    row = next(line for line in console.export_text().splitlines() if guid in line and "│" in line)
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[3:5] == ["4", "4"]
    # a message without a number (another client's) still counts, once per message
    watch.take([ReceivedMessage(9, "127.0.0.2", guid, "2026-01-01T00:00:01.000000Z", b"plain text")])
    assert watch.received[guid] == 5


def _fleet(count: int, sending: int) -> list[Track]:
    tracks = []
    for n in range(count):
        guid = f"{n:08x}-0000-4000-8000-{n:012x}"
        state = DeviceState.SENDING if n < sending else DeviceState.REGISTERING
        snap = RuntimeSnapshot(guid=guid, state=state, telemetry_sent=3 if n < sending else 0)
        tracks.append(Track(guid, snap))
    return tracks


def test_off_a_terminal_the_status_is_one_short_line_for_a_big_fleet() -> None:
    tracks = _fleet(50, sending=40)
    received = {t.guid: 3 for t in tracks[:40]}
    now = datetime(2026, 1, 1, 12, 0, 5, tzinfo=UTC)
    line = status_line(tracks, received, 120, now)
    assert len(line) <= 120 and "\n" not in line
    assert line.startswith("12:00:05 50 devices: 40 SENDING, 10 REGISTERING; acked 120, hub got 120")
    waiting = line.split("not sending yet (10):", 1)[1].split()
    shown = [w for w in waiting if len(w) == 8]
    assert shown == [t.guid[:8] for t in tracks[40 : 40 + len(shown)]] and shown
    assert waiting[-2:] == [f"+{10 - len(shown)}", "more"]

    everyone = status_line(_fleet(3, sending=3), {}, 120, now)
    assert "not sending yet" not in everyone and everyone.endswith("acked 9, hub got 0")
    few = status_line(_fleet(3, sending=1), {}, 120, now)
    assert few.endswith("not sending yet (2): 00000001 00000002")
    assert len(status_line(_fleet(500, sending=0), {}, 60, now)) <= 60
