"""``make demo DEMO_ARGS="--cert-minutes N"`` as processes: the factory mints certificates valid minutes, and
every device renews its own through the factory's EST listener while its telemetry keeps flowing.

Kept short: 2-minute certificates (backdated 5 minutes by the factory, so 7 minutes long) renewed at 0.74 of
the lifetime, i.e. about 11 s after minting (the devices boot within a few seconds of it and send every
second, so telemetry flows before, during and after the renewal); ``--until-renewed`` ends the run once each
device has renewed and sent 3 messages more.  What the hubs received is read from the emulator's own store."""

from __future__ import annotations

import json

import pytest
from test_demo_flow import _demo, _hub_messages, _processes_under, _stack_args

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]


def test_devices_renew_short_lived_certificates_while_telemetry_flows(tmp_path):
    work = tmp_path / "demo"
    summary_file = tmp_path / "summary.json"
    proc = _demo(
        "run", *_stack_args(work), "--devices", "2", "--interval", "1",
        "--cert-minutes", "2", "--renew-fraction", "0.74", "--until-renewed", "--seconds", "300",
        "--summary-json", str(summary_file),
    )  # fmt: skip
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-8000:]
    assert "factory EST renewal" in output  # the listener's URL among the endpoints
    assert output.count(" renewed serial ") >= 2, output[-8000:]  # the view told each renewal

    summary = json.loads(summary_file.read_text())
    assert summary["ok"] is True and summary["expect_renewal"] is True
    assert summary["renewals"] >= 2
    received: dict[str, list[int]] = {}
    for message in _hub_messages(work):
        received.setdefault(message.device_id, []).append(json.loads(message.body)["seq"])
    for device in summary["devices"]:
        assert device["renewals"] >= 1, device
        assert device["error"] is None, device
        assert device["telemetry_gaps"] == 0, device
        seqs = received[device["guid"]]
        # every message the device had acknowledged reached its hub, none missing before the last
        assert sorted(set(seqs)) == list(range(1, max(seqs) + 1))
        assert max(seqs) >= device["telemetry_acknowledged"]
    assert _processes_under(work) == []
