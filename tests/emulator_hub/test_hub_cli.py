"""The monitor and messages commands: ``messages`` against a real database file, ``monitor`` against a real
emulator (run in this process, fed through its hub service) whose built-in endpoints it reads over AMQP."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
from datetime import UTC, datetime
from io import StringIO

import pytest
from conftest import free_loopback_address
from support.waiting import until

from azure_iot_emulator.app import Emulator
from azure_iot_emulator.config import EmulatorConfig
from azure_iot_emulator.hub import cli
from azure_iot_emulator.hub.telemetry import TelemetryStore
from azure_iot_emulator.hub.topics import PropertyBag
from azure_iot_emulator.store import Database


def _store(tmp_path):
    return TelemetryStore(Database(tmp_path / "emulator.db"), lambda: datetime.now(UTC))


def _parse(argv, data_dir):
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers(), data_dir)
    return parser.parse_args(argv)


def test_messages_prints_recent_with_properties(tmp_path):
    store = _store(tmp_path)
    store.append(
        "127.0.0.2", "dev-1", PropertyBag({"messageId": "m1"}, {"alert": "hi there"}), b'{"t": 21.5}'
    )
    store.append("127.0.0.2", "dev-2", PropertyBag(), b"other")
    out = StringIO()
    assert cli.run_messages(_parse(["messages", "--device", "dev-1", "--json"], tmp_path), out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["body"] == {"t": 21.5} and lines[0]["properties"] == {"alert": "hi there"}
    out = StringIO()
    cli.run_messages(_parse(["messages", "--device", "dev-2"], tmp_path), out)
    assert "127.0.0.2/dev-2" in out.getvalue() and out.getvalue().rstrip().endswith("other")


@pytest.fixture
async def live(tmp_path):
    """A running emulator (one hub) and a function storing a message on it as a device's publish would."""
    config = EmulatorConfig(
        data_dir=tmp_path / "emulator", dps_host=free_loopback_address(), hub_hosts=(free_loopback_address(),)
    ).validated()
    emulator = Emulator(config)
    await emulator.start()
    assert emulator.hub is not None
    host = config.hub_hosts[0]

    async def store(device: str, properties: PropertyBag, body: bytes) -> None:
        await emulator.hub.service.ingest(host, device, properties, body)

    try:
        yield config.data_dir, host, store
    finally:
        await emulator.stop()


@pytest.mark.slow
async def test_monitor_tails_new_messages_only_for_the_device(live):
    data_dir, host, store = live
    await store("dev-1", PropertyBag(), b"old")
    out = StringIO()
    stop, watching = threading.Event(), threading.Event()

    def should_stop() -> bool:  # asked first once the monitor has taken its starting point
        watching.set()
        return stop.is_set()

    args = _parse(["monitor", "--device", "dev-1", "--json"], data_dir)
    worker = asyncio.create_task(asyncio.to_thread(cli.run_monitor, args, out, should_stop))
    try:
        await until(watching.is_set, "the monitor watching", timeout=30)
        await store("dev-2", PropertyBag(), b"not mine")
        await store("dev-1", PropertyBag({}, {"k": "v"}), b"new")
        await until(lambda: "new" in out.getvalue(), "the new message printed", timeout=30)
    finally:
        stop.set()
        assert await asyncio.wait_for(worker, 30) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["body"] for line in lines] == ["new"]
    assert lines[0]["properties"] == {"k": "v"} and lines[0]["hub"] == host


def test_messages_without_database_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from azure_iot_emulator.hub import cli; import argparse;"
            "p=argparse.ArgumentParser(); cli.add_commands(p.add_subparsers(), sys.argv[1]);"
            "a=p.parse_args(['messages','--device','x']); a.func(a)",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "no emulator database" in result.stderr


def test_each_message_shows_its_devices_own_sequence_number(tmp_path):
    """Two devices interleaved: the line carries the sequence number in the device's message (what its
    log says), not the store's running number across devices."""
    store = _store(tmp_path)
    for seq in (41, 42):
        store.append("h", "dev-a", PropertyBag(), json.dumps({"seq": seq, "t": 1}).encode())
        store.append("h", "dev-b", PropertyBag(), json.dumps({"seq": seq + 100}).encode())
    store.append("h", "dev-a", PropertyBag(), b"no number")
    out = StringIO()
    cli.run_messages(_parse(["messages", "--device", "dev-a"], tmp_path), out)
    lines = out.getvalue().splitlines()
    assert [line.split(" ", 1)[1].split(" {")[0] for line in lines[:2]] == [
        "h/dev-a seq 41",
        "h/dev-a seq 42",
    ]
    assert lines[2].endswith(" h/dev-a no number") and "#" not in out.getvalue()


@pytest.mark.slow
async def test_monitor_marks_a_repeated_message_id_per_device(live):
    data_dir, host, store = live
    for device, mid, body in [
        ("dev-1", "dev-1:1", b"a"),
        ("dev-1", "dev-1:2", b"b"),
        ("dev-2", "dev-1:1", b"same id, another device"),
        ("dev-1", "dev-1:2", b"b"),  # resent after a lost acknowledgement
        ("dev-1", "dev-1:3", b"c"),
    ]:
        await store(device, PropertyBag({"messageId": mid}), body)
    out = StringIO()
    args = _parse(["monitor", "--last", "10", "--json"], data_dir)
    assert await asyncio.to_thread(cli.run_monitor, args, out, lambda: True) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["body"] for line in lines] == ["a", "b", "same id, another device", "b", "c"]  # store order
    assert [line.get("repeatOf") for line in lines] == [None, None, None, lines[1]["sequenceNumber"], None]
    text = StringIO()
    await asyncio.to_thread(
        cli.run_monitor, _parse(["monitor", "--last", "10"], data_dir), text, lambda: True
    )
    marked = [line for line in text.getvalue().splitlines() if "REPEATED id" in line]
    assert len(marked) == 1 and f" {host}/dev-1 REPEATED id " in marked[0] and marked[0].endswith(" b")
    # --last N: the newest N of them.
    last2 = StringIO()
    await asyncio.to_thread(
        cli.run_monitor, _parse(["monitor", "--last", "2", "--json"], data_dir), last2, lambda: True
    )
    assert [json.loads(line)["body"] for line in last2.getvalue().splitlines()] == ["b", "c"]


def test_monitor_without_a_running_emulator_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no running emulator"):
        cli.run_monitor(_parse(["monitor"], tmp_path), StringIO(), lambda: True)


def test_the_data_directory_comes_from_the_environment_as_serve_reads_it(tmp_path, monkeypatch):
    """After `source var/up/env.sh` (IOT_EMULATOR_DATA_DIR), `messages` and `monitor` need no --data-dir."""
    store = _store(tmp_path)
    store.append("127.0.0.2", "dev-1", PropertyBag(), b"from the environment")
    monkeypatch.setenv("IOT_EMULATOR_DATA_DIR", str(tmp_path))
    out = StringIO()
    args = _parse(["messages", "--device", "dev-1"], tmp_path / "elsewhere")
    assert args.data_dir == str(tmp_path) and cli.run_messages(args, out) == 0
    assert out.getvalue().rstrip().endswith("from the environment")
    assert _parse(["monitor"], tmp_path / "elsewhere").data_dir == str(tmp_path)
    assert _parse(["monitor", "--data-dir", "given"], tmp_path / "elsewhere").data_dir == "given"


def test_a_line_for_a_person_is_short_and_names_the_message_id_and_its_properties(tmp_path):
    store = _store(tmp_path)
    system = {"messageId": "m-42", "contentType": "application/json", "contentEncoding": "utf-8"}
    store.append("127.0.0.2", "dev-1", PropertyBag(system, {"alert": "hot"}), b'{"seq": 7, "t": 21.5}')
    out = StringIO()
    assert cli.run_messages(_parse(["messages", "--device", "dev-1"], tmp_path), out) == 0
    (line,) = out.getvalue().splitlines()
    assert "127.0.0.2/dev-1 seq 7 id=m-42" in line and '{"alert": "hot"}' in line
    assert "contentEncoding" not in line and len(line) < 100  # all of them: --json
