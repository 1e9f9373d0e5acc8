"""``iot-emulator monitor`` and ``iot-emulator messages``: watch and read stored telemetry.

``monitor`` reads the running emulator's hubs like any back end reads Azure's: from each hub's built-in
Event Hub-compatible endpoint (AMQP 5671, azure-eventhub, the connection strings and CA of the data dir's
``connection.json``; ``hub/eventhub/reader.py``).  ``messages`` reads the SQLite file (WAL mode lets a
reader run beside the serving process), so it also works while the emulator is stopped.  Both number a
message as the hub's store does (its offset on the built-in endpoint).  ``monitor`` marks a message whose
message id
(``$.mid``) it has already shown for that device -- the copy a device resends when the acknowledgement of
the first was lost -- with ``REPEATED id`` (with ``--json``: ``"repeatOf"``, the hub's ``sequenceNumber``
of the first copy)::

    iot-emulator monitor  [--data-dir DIR] [--device ID] [--hub HOST] [--last N] [--json]
    iot-emulator messages --device ID [--data-dir DIR] [--hub HOST] [--limit N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import jsonsafe
from azure_iot_emulator.connection_info import CONNECTION_FILE, ConnectionInfo, read_connection_info
from azure_iot_emulator.hub.eventhub.reader import TelemetryTail
from azure_iot_emulator.hub.telemetry import StoredMessage, TelemetryStore
from azure_iot_emulator.store import Database

POLL_SECONDS = 0.1  # how often the monitor asks whether to stop
_REMEMBERED_IDS = 100_000  # message ids the monitor remembers to spot repeats (oldest forgotten first)


def device_sequence(message: StoredMessage) -> int | None:
    """The device's own message number (the ``seq`` of a JSON body), if it numbers its messages: what a
    person compares with the device's log, unlike the hub store's numbering across all devices."""
    text = message.body_text()
    if not text or not text.lstrip().startswith("{"):
        return None
    try:
        seq = jsonsafe.loads(text).get("seq")
    except (jsonsafe.JsonRefused, AttributeError):
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


class RepeatedIds:
    """The message ids seen per (hub, device), to mark a repeat with the sequence number of the first."""

    def __init__(self, capacity: int = _REMEMBERED_IDS) -> None:
        self._first: dict[tuple[str, str, str], int] = {}
        self._capacity = capacity

    def first_of(self, message: StoredMessage) -> int | None:
        """The sequence number of an earlier message with this one's id, or None (remembers it)."""
        mid = message.system_properties.get("messageId")
        if not mid:
            return None
        key = (message.hub, message.device_id, mid)
        first = self._first.get(key)
        if first is None:
            self._first[key] = message.seq
            if len(self._first) > self._capacity:
                del self._first[next(iter(self._first))]
        return first


def _format(message: StoredMessage, as_json: bool, repeat_of: int | None = None) -> str:
    if as_json:
        data = message.to_json()
        if repeat_of is not None:
            data["repeatOf"] = repeat_of
        return json.dumps(data, sort_keys=True)
    text = message.body_text()
    body = (
        text if text is not None else f"<{len(message.body)} bytes, base64 {message.to_json()['bodyBase64']}>"
    )
    # One short line a person reads: the time of day, who, the message id and the application properties;
    # every system property (content type, encoding, ...) is in --json.
    props = ""
    message_id = message.system_properties.get("messageId")
    if message_id:
        props += f" id={message_id}"
    if message.application_properties:
        props += " " + json.dumps(message.application_properties, sort_keys=True, ensure_ascii=False)
    seq = device_sequence(message)
    number = f" seq {seq}" if seq is not None else ""
    repeated = " REPEATED id" if repeat_of is not None else ""
    when = message.enqueued_time[11:23] if len(message.enqueued_time) >= 23 else message.enqueued_time
    return f"{when} {message.hub}/{message.device_id}{number}{repeated}{props} {body}"


def _open_store(data_dir: Path) -> tuple[Database, TelemetryStore]:
    db_path = data_dir / "emulator.db"
    if not db_path.exists():
        raise SystemExit(
            f"no emulator database at {db_path} (start `iot-emulator serve` first or pass --data-dir)"
        )
    db = Database(db_path)
    return db, TelemetryStore(db, lambda: datetime.now(UTC))


def run_messages(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    db, store = _open_store(Path(args.data_dir))
    try:
        for message in store.recent(hub=args.hub, device_id=args.device, limit=args.limit):
            print(_format(message, args.json), file=out, flush=True)
    finally:
        db.close()
    return 0


def _running(data_dir: Path) -> ConnectionInfo:
    info = read_connection_info(data_dir / CONNECTION_FILE)
    if info is None:
        raise SystemExit(
            f"no running emulator: {data_dir / CONNECTION_FILE} is missing (start `iot-emulator serve` first "
            "or pass --data-dir)"
        )
    return info


def run_monitor(
    args: argparse.Namespace,
    out: TextIO = sys.stdout,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Tail the hubs' built-in endpoints; ``should_stop`` is first asked once the starting point is taken
    (and the ``--last`` backlog printed)."""
    info = _running(Path(args.data_dir))
    hubs = [hub for hub in info["hubs"] if args.hub is None or hub["host_name"] == args.hub]
    if not hubs:
        raise SystemExit(f"the running emulator has no hub {args.hub}")
    try:
        return asyncio.run(_monitor(args, TelemetryTail(hubs, info["ca_pem_path"]), out, should_stop))
    except KeyboardInterrupt:
        return 0


async def _monitor(
    args: argparse.Namespace, tail: TelemetryTail, out: TextIO, should_stop: Callable[[], bool]
) -> int:
    repeats = RepeatedIds()
    errors: list[str] = []
    backlog: list[StoredMessage] = []
    live: list[StoredMessage] = []
    pending: set[tuple[str, str]] = set()
    caught_up = asyncio.Event()

    def show(message: StoredMessage) -> None:
        print(_format(message, args.json, repeats.first_of(message)), file=out, flush=True)

    try:
        ends = await tail.ends()
        after = dict(ends)
        if args.last:
            # The backlog: the last N of each partition (a device's all: it shares its partition).
            after = {key: -1 if args.device else max(-1, end - args.last) for key, end in ends.items()}
            pending = {key for key, end in ends.items() if end > after[key]}

        def on_message(message: StoredMessage, partition: str, seq: int) -> None:
            key = (message.hub, partition)
            if args.device is not None and message.device_id != args.device:
                pass
            elif key in ends and seq <= ends[key] and pending:
                backlog.append(message)
            elif pending:
                live.append(message)  # shown after the backlog
            else:
                show(message)
            if key in pending and seq >= ends[key]:
                pending.discard(key)
                if not pending:
                    caught_up.set()

        await tail.start(on_message, after=after, on_error=lambda hub, exc: errors.append(f"{hub}: {exc}"))
        if pending:
            await caught_up.wait()
        for message in sorted(backlog, key=lambda m: m.seq)[-args.last :] if args.last else []:
            show(message)
        for message in live:
            show(message)
        if not args.json:
            target = args.device or "all devices"
            print(f"# watching telemetry from {target} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        while not should_stop():
            if errors:
                print(f"# built-in endpoint error: {errors.pop(0)}", file=sys.stderr, flush=True)
            await asyncio.sleep(POLL_SECONDS)
    finally:
        await tail.close()
    return 0


def add_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], default_data_dir: str | Path
) -> None:
    """Add ``monitor`` and ``messages`` to the emulator CLI (each sets ``func``).  Their data directory is
    ``--data-dir``, else IOT_EMULATOR_DATA_DIR (as ``serve`` reads it; ``make up``'s env.sh sets it)."""
    data_dir = os.environ.get("IOT_EMULATOR_DATA_DIR") or str(default_data_dir)
    data_dir_help = "emulator data directory (or IOT_EMULATOR_DATA_DIR)"
    monitor = subparsers.add_parser(
        "monitor", allow_abbrev=False, help="tail device-to-cloud telemetry live (the built-in endpoints)"
    )
    monitor.add_argument("--data-dir", default=data_dir, metavar="DIR", help=data_dir_help)
    monitor.add_argument("--device", help="only this device id")
    monitor.add_argument("--hub", help="only this hub host name")
    monitor.add_argument(
        "--last", type=int, default=0, metavar="N", help="first print the last N stored messages"
    )
    monitor.add_argument("--json", action="store_true", help="one JSON object per line")
    monitor.set_defaults(func=run_monitor)

    messages = subparsers.add_parser("messages", allow_abbrev=False, help="print a device's recent telemetry")
    messages.add_argument("--data-dir", default=data_dir, metavar="DIR", help=data_dir_help)
    messages.add_argument("--device", required=True, help="device id")
    messages.add_argument("--hub", help="only this hub host name")
    messages.add_argument("--limit", type=int, default=20, metavar="N", help="how many (newest last)")
    messages.add_argument("--json", action="store_true", help="one JSON object per line")
    messages.set_defaults(func=run_messages)
