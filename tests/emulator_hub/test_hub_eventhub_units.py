"""The AMQP endpoint's pure parts without sockets: the SASL exchange, full-length performatives, Event
Hubs' selector filters, and the built-in endpoint's positions in a real SQLite file."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest
from proton import Data

from azure_iot_emulator.amqp.frames import ARITY, FramePadder, pad_frame
from azure_iot_emulator.amqp.sasl import AMQP_HEADER, SASL_HEADER, SaslRefused, SaslServer
from azure_iot_emulator.hub.eventhub.model import Position, PositionError, parse_selector, partition_of
from azure_iot_emulator.hub.eventhub.service import EventHubError, EventHubService
from azure_iot_emulator.hub.eventhub.store import EventHubStore, PartitionCountChanged
from azure_iot_emulator.hub.telemetry import TelemetryStore
from azure_iot_emulator.hub.topics import PropertyBag
from azure_iot_emulator.store import Database


def described_list(code: int, *fields) -> bytes:
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(code)
    data.put_list()
    data.enter()
    for field in fields:
        data.put_object(field)
    data.exit()
    data.exit()
    return data.encode()


def frame(body: bytes, kind: int = 0) -> bytes:
    return struct.pack(">IBBH", 8 + len(body), 2, kind, 0) + body


def sasl_init(mechanism: str) -> bytes:
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(0x41)
    data.put_list()
    data.enter()
    data.put_symbol(mechanism)
    data.exit()
    data.exit()
    return frame(data.encode(), kind=1)


@pytest.mark.parametrize("mechanism", ["MSSBCBS", "ANONYMOUS"])
def test_sasl_lets_azure_clients_in_and_hands_over_what_follows(mechanism):
    server = SaslServer()
    first = server.feed(SASL_HEADER)
    assert first.reply.startswith(SASL_HEADER) and not first.done
    mechanisms = Data()
    mechanisms.decode(first.reply[8 + 8 :])
    assert {"MSSBCBS", "ANONYMOUS"} <= {str(m) for m in mechanisms.get_object().value[0]}
    init = sasl_init(mechanism)
    partial = server.feed(init[:5])  # a frame split across reads
    assert not partial.done and partial.reply == b""
    done = server.feed(init[5:] + AMQP_HEADER + b"open...")
    assert done.done and done.mechanism == mechanism
    outcome = Data()
    outcome.decode(done.reply[8:])
    assert outcome.get_object().value[0] == 0  # ok
    assert done.rest == AMQP_HEADER + b"open..."


def test_sasl_refuses_other_mechanisms_and_other_protocols():
    with pytest.raises(SaslRefused) as refused:
        server = SaslServer()
        server.feed(SASL_HEADER)
        server.feed(sasl_init("PLAIN"))
    assert refused.value.reply  # the failed outcome is sent before closing
    with pytest.raises(SaslRefused):
        SaslServer().feed(b"GET / HTTP/1.1\r\n")
    plain = SaslServer().feed(AMQP_HEADER + b"x")
    assert plain.done and plain.rest == AMQP_HEADER + b"x"


def test_performatives_are_written_with_every_field():
    short_open = frame(described_list(0x10, "container"))
    padded = pad_frame(short_open)
    data = Data()
    data.decode(padded[8:])
    fields = data.get_object().value
    assert len(fields) == ARITY[0x10] and fields[0] == "container" and fields[1:] == [None] * 9
    # A transfer keeps its payload after the (now longer) performative.
    transfer = frame(described_list(0x14, 0, 1) + b"PAYLOAD")
    out = pad_frame(transfer)
    assert out.endswith(b"PAYLOAD") and struct.unpack(">I", out[:4])[0] == len(out)
    # Empty performatives (list0), keep-alives and full lists.
    close = frame(b"\x00\x53\x18\x45")
    assert pad_frame(close) == frame(b"\x00\x53\x18\xc0\x02\x01\x40")
    keepalive = struct.pack(">IBBH", 8, 2, 0, 0)
    assert pad_frame(keepalive) == keepalive
    full = frame(described_list(0x16, 1, True, None))
    assert pad_frame(full) == full
    # The stream: the protocol header passes, frames split anywhere come out whole.
    padder = FramePadder()
    stream = AMQP_HEADER + short_open + close
    out = b"".join(padder.feed(stream[i : i + 3]) for i in range(0, len(stream), 3))
    assert out == AMQP_HEADER + pad_frame(short_open) + pad_frame(close)


def test_selector_filters_as_event_hubs_clients_write_them():
    assert parse_selector(None) == Position.start()
    assert parse_selector("amqp.annotation.x-opt-offset > '-1'") == Position("offset", -1)
    assert parse_selector("amqp.annotation.x-opt-offset > '@latest'").latest
    assert parse_selector("amqp.annotation.x-opt-sequence-number >= '5'") == Position("sequence", 5, True)
    assert parse_selector("amqp.annotation.x-opt-enqueued-time > '1700000000000'") == Position(
        "enqueued", 1700000000000
    )
    for bad in (
        "amqp.annotation.x-opt-offset < '5'",
        "1=1",
        "amqp.annotation.x-opt-offset > 'abc'",
        # beyond what SQLite's integers and a datetime hold: refused here, not an error deeper down
        f"amqp.annotation.x-opt-offset > '{10**30}'",
        f"amqp.annotation.x-opt-sequence-number >= '-{10**30}'",
        f"amqp.annotation.x-opt-enqueued-time > '{10**16}'",
        "amqp.annotation.x-opt-enqueued-time > '-5'",
        "amqp.annotation.x-opt-offset > '" + "9" * 5000 + "'",
    ):
        with pytest.raises(PositionError):
            parse_selector(bad)


def test_partition_ids_other_than_plain_numbers_are_not_found(tmp_path):
    clock = Clock()
    store = EventHubStore(Database(tmp_path / "emulator.db"), {"hub": 4}, clock())
    eventhub = EventHubService(store, ["hub"], clock, timedelta(days=1))
    assert eventhub.partition("hub", "3") == 3
    for bad in ("4", "03", "-1", "\u00b2", "\u0663", "9" * 5000, "", " 1"):
        with pytest.raises(EventHubError) as info:
            eventhub.partition("hub", bad)
        assert info.value.status == 404 and info.value.condition == "amqp:not-found"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_positions_are_per_partition_without_gaps_and_retention_hides_old_events(tmp_path):
    clock = Clock()
    db = Database(tmp_path / "emulator.db")
    events = EventHubStore(db, {"hub": 4}, clock())
    telemetry = TelemetryStore(db, clock, on_positions=events.record)
    a, b = (
        "dev-a",
        next(d for d in (f"dev-{i}" for i in range(50)) if partition_of(d, 4) != partition_of("dev-a", 4)),
    )
    pa, pb = partition_of(a, 4), partition_of(b, 4)
    bag = PropertyBag({"messageId": "m"}, {"k": "v"})
    telemetry.insert([("hub", a, bag, b"a0"), ("hub", b, bag, b"b0"), ("hub", a, bag, b"a1")])
    clock.now += timedelta(hours=2)
    telemetry.insert([("hub", a, bag, b"a2")])
    since = clock.now - timedelta(days=1)
    read = events.read("hub", pa, 0, 10, since)
    assert [(e.sequence_number, e.body) for e in read] == [(0, b"a0"), (1, b"a1"), (2, b"a2")]
    assert [e.sequence_number for e in events.read("hub", pb, 0, 10, since)] == [0]
    assert read[0].system_properties == {"messageId": "m"} and read[0].application_properties == {"k": "v"}
    offsets = [e.offset for e in read]
    assert events.start_of("hub", pa, Position("offset", offsets[0]), since) == 1
    assert events.start_of("hub", pa, Position("offset", offsets[0], inclusive=True), since) == 0
    assert events.start_of("hub", pa, Position("sequence", 1), since) == 2
    assert events.start_of("hub", pa, Position("offset", 0, latest=True), since) == 3
    late = int(read[2].enqueued_time.timestamp() * 1000)
    assert events.start_of("hub", pa, Position("enqueued", late, inclusive=True), since) == 2
    assert events.start_of("hub", pa, Position("enqueued", late), since) == 3
    # One hour of retention: the first two are out of it.
    recent = clock.now - timedelta(hours=1)
    assert [e.body for e in events.read("hub", pa, 0, 10, recent)] == [b"a2"]
    info = events.partition_info("hub", pa, recent)
    assert (info.begin_sequence_number, info.last_sequence_number, info.empty) == (2, 2, False)
    assert events.start_of("hub", pa, Position.start(), recent) == 2
    assert events.prune(recent) == 3
    assert events.read("hub", pa, 0, 10, since)[0].body == b"a2"
    db.close()


def test_the_partition_count_is_fixed_when_the_hub_is_created_and_old_messages_get_positions(tmp_path):
    clock = Clock()
    db = Database(tmp_path / "emulator.db")
    telemetry = TelemetryStore(db, clock)  # messages stored before the endpoint existed
    telemetry.insert([("hub", "dev-a", PropertyBag(), b"old")])
    events = EventHubStore(db, {"hub": 4}, clock())
    assert events.index_unpositioned() == 1
    assert events.index_unpositioned() == 0
    assert events.read("hub", partition_of("dev-a", 4), 0, 10, clock() - timedelta(days=1))[0].body == b"old"
    db.close()
    db = Database(tmp_path / "emulator.db")
    with pytest.raises(PartitionCountChanged, match="4 partitions"):
        EventHubStore(db, {"hub": 8}, clock())
    db.close()


def test_a_batch_over_every_partition_of_three_hubs_continues_each_partition_from_where_it_stood(tmp_path):
    """One commit touching more partitions (3 hubs x 128) than one statement reads at once: each partition
    still counts on from its own last sequence number, none skipped or repeated."""
    clock = Clock()
    db = Database(tmp_path / "emulator.db")
    hubs = ("hub-a", "hub-b", "hub-c")
    events = EventHubStore(db, dict.fromkeys(hubs, 128), clock())
    telemetry = TelemetryStore(db, clock, on_positions=events.record)
    devices: dict[int, str] = {}
    for i in range(100_000):
        devices.setdefault(partition_of(f"dev-{i}", 128), f"dev-{i}")
        if len(devices) == 128:
            break
    bag = PropertyBag()
    telemetry.insert([(hubs[0], devices[0], bag, b"first")])  # hub-a's partition 0 stands at 1
    telemetry.insert([(hub, device, bag, b"x") for hub in hubs for device in devices.values()] * 2)
    since = clock() - timedelta(days=1)
    for hub in hubs:
        for partition in range(128):
            read = events.read(hub, partition, 0, 10, since)
            start = 1 if (hub, partition) == (hubs[0], 0) else 0
            assert [e.sequence_number for e in read] == list(range(start + 2)), (hub, partition)
    db.close()
