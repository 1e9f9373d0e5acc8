"""Every hostile JSON shape (tests/support/hostile_json.py) as the body of a device's telemetry message, which
the hub stores as bytes, whatever they are, and which three readers try as JSON: the hub's REST extension
(``StoredMessage.to_json``, behind ``GET /devices/{id}/messages``), the ``hub monitor`` command's device
sequence number, and the demo's live view.  Each shows such a body (as its text, or its size) and goes on;
none raises, and what the REST extension answers is strict JSON."""

from __future__ import annotations

import json
import os

import pytest
from rich.console import Console
from support.hostile_json import SHAPES, Hostile, shape_id

from azure_iot_emulator.hub.cli import device_sequence
from azure_iot_emulator.hub.telemetry import StoredMessage
from devprov_demo.hub_feed import ReceivedMessage
from devprov_demo.view import HubWatch, Layout, telemetry_panel

ENQUEUED = "2026-05-01T10:11:12.1234560Z"
GUID = "ce8b6f4e-410e-499d-812a-bb3fb86a0c11"


def _body(shape: Hostile) -> bytes:
    return shape.body(lambda value: b'{"seq": 7, "readings": {"t": ' + value + b"}}")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_the_hubs_rest_extension_shows_a_hostile_body_as_text(shape: Hostile) -> None:
    body = _body(shape)
    served = StoredMessage(1, "hub", GUID, ENQUEUED, {}, {}, body).to_json()
    json.dumps(served, allow_nan=False)  # strict JSON, whatever the device sent
    if not shape.utf8:
        assert served["body"] is None  # bodyBase64 holds it
    elif shape.reason is not None:
        assert served["body"] == body.decode()
    seq = device_sequence(StoredMessage(1, "hub", GUID, ENQUEUED, {}, {}, body))
    assert seq == (7 if shape.reason is None and not shape.whole else None)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_the_demos_live_view_shows_a_hostile_body_and_counts_it(shape: Hostile) -> None:
    watch = HubWatch(None)
    watch.take([ReceivedMessage(1, "hub", GUID, ENQUEUED, _body(shape))])
    assert watch.received[GUID] == 1
    console = Console(record=True, width=160, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(telemetry_panel(watch.tail, Layout.for_width(160)))
    console.file.close()
    assert GUID in console.export_text()
