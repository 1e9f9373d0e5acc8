"""The hub's AMQP side (port 5671) against a real emulator process, with Microsoft's clients unchanged:
the built-in Event Hub-compatible endpoint read with azure-eventhub (its aio EventHubConsumerClient) while
devices send through azure-iot-device (positions, consumer groups, properties, CBS refusals), and
azure-iot-hub's ``send_c2d_message`` reaching devices over MQTT."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import ssl
import time
import urllib.parse
from pathlib import Path

import pytest
from azure.core.credentials import AzureSasCredential
from azure.eventhub.aio import EventHubConsumerClient
from azure.eventhub.exceptions import AuthenticationError, EventHubError
from azure.iot.device import Message
from azure.iot.device.aio import IoTHubDeviceClient
from azure.iot.hub import IoTHubRegistryManager
from builtin_endpoint import Hub, T, in_thread, parse, receive, stop
from support.waiting import until

from azure_iot_emulator.hub.eventhub.model import partition_of
from devprov_demo.hub_feed import HubFeed


@pytest.fixture(scope="module")
def module_hub(module_emulator, tmp_path_factory):
    return Hub(module_emulator, module_emulator.default_hub, tmp_path_factory.mktemp("certs"))


@pytest.fixture
def hub(module_hub, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(module_hub.emulator.ca_path))  # the registry's REST calls
    return module_hub


async def send(client: IoTHubDeviceClient, count: int, tag: str, **system) -> list[str]:
    """``count`` JSON messages with ids ``{tag}-{i}``, a custom property and the given system properties."""
    ids = []
    for i in range(count):
        message = Message(json.dumps({"tag": tag, "i": i}), message_id=f"{tag}-{i}", **system)
        message.custom_properties["seq"] = str(i)
        await asyncio.wait_for(client.send_message(message), T)
        ids.append(f"{tag}-{i}")
    return ids


async def read_tagged(hub, tag: str, count: int, group: str = "$Default", **position) -> list:
    """Events read from ``position`` (receive()'s keywords) until ``count`` of them carry ``tag``."""
    return await receive(hub.consumer(group), lambda got: len(of_tag(got, tag)) == count, **position)


def of_tag(events, tag: str) -> list:
    return [e for e in events if e.body_as_json().get("tag") == tag]


@pytest.mark.slow
async def test_reads_telemetry_from_the_beginning_with_iot_hub_properties(hub):
    a = await hub.device("eh-props-a")
    b = await hub.device("eh-props-b")
    try:
        sent_a = await send(a, 3, "props-a", content_type="application/json", content_encoding="utf-8")
        sent_b = await send(b, 2, "props-b")
    finally:
        await a.shutdown()
        await b.shutdown()
    events = await receive(
        hub.consumer(),
        lambda got: len(of_tag(got, "props-a")) == 3 and len(of_tag(got, "props-b")) == 2,
        starting_position="-1",
    )
    got_a = of_tag(events, "props-a")
    assert [e.message_id for e in got_a] == sent_a  # in order
    assert [e.message_id for e in of_tag(events, "props-b")] == sent_b
    first = got_a[0]
    assert first.body_as_json() == {"tag": "props-a", "i": 0}
    assert first.properties == {b"seq": b"0"}
    assert first.content_type == "application/json"
    system = first.system_properties
    assert system[b"iothub-connection-device-id"] == b"eh-props-a"
    assert system[b"iothub-message-source"] == b"Telemetry"
    assert system[b"content-encoding"] == b"utf-8"
    assert json.loads(system[b"iothub-connection-auth-method"])["type"] == "x509Certificate"
    assert b"iothub-enqueuedtime" in system
    # A device's messages stay in one partition (the hash of its id), numbered without gaps.
    seqs = [e.sequence_number for e in got_a]
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    offsets = [int(e.offset) for e in got_a]
    assert offsets == sorted(offsets) and len(set(offsets)) == 3
    assert first.enqueued_time is not None and first.enqueued_time.tzinfo is not None
    partitions = (await hub_props(hub))["partition_ids"]
    assert partitions == ["0", "1", "2", "3"]
    expected = str(partition_of("eh-props-a", 4))
    info = await partition_props(hub, expected)
    assert info["last_enqueued_sequence_number"] >= seqs[-1]
    assert not info["is_empty"]


async def hub_props(hub) -> dict:
    client = hub.consumer()
    try:
        return await client.get_eventhub_properties()
    finally:
        await client.close()


async def partition_props(hub, partition_id: str) -> dict:
    client = hub.consumer()
    try:
        return await client.get_partition_properties(partition_id)
    finally:
        await client.close()


@pytest.mark.slow
async def test_reads_from_an_offset_a_sequence_number_and_an_enqueued_time(hub):
    device = await hub.device("eh-positions")
    partition = str(partition_of("eh-positions", 4))
    try:
        await send(device, 3, "pos-early")
        early = await read_tagged(hub, "pos-early", 3, starting_position="-1", partition_id=partition)
        last_early = of_tag(early, "pos-early")[-1]
        await send(device, 2, "pos-late")
    finally:
        await device.shutdown()

    def late_only(events):
        return [e.body_as_json()["tag"] for e in events if e.body_as_json()["tag"].startswith("pos-")]

    # After the last early event's offset: the late ones only.
    by_offset = await read_tagged(
        hub, "pos-late", 2, starting_position=last_early.offset, partition_id=partition
    )
    assert late_only(by_offset) == ["pos-late", "pos-late"]
    # From a sequence number, inclusive: the last early one, then the late ones.
    by_seq = await read_tagged(
        hub,
        "pos-late",
        2,
        starting_position=last_early.sequence_number,
        starting_position_inclusive=True,
        partition_id=partition,
    )
    assert late_only(by_seq) == ["pos-early", "pos-late", "pos-late"]
    assert by_seq[0].sequence_number == last_early.sequence_number
    # From an enqueued time: everything enqueued at or after the last early event.
    by_time = await read_tagged(
        hub,
        "pos-late",
        2,
        starting_position=last_early.enqueued_time,
        starting_position_inclusive=True,
        partition_id=partition,
    )
    assert late_only(by_time)[0] == "pos-early" and late_only(by_time)[-2:] == ["pos-late", "pos-late"]
    assert all(e.enqueued_time >= last_early.enqueued_time for e in by_time)


@pytest.mark.slow
async def test_two_consumer_groups_read_independently_and_new_events_arrive_live(hub):
    status, body = await hub.rest("PUT", "/eventHubEndpoints/events/ConsumerGroups/analytics")
    assert status == 200, body
    assert body["name"] == "analytics" and body["properties"]["created"]
    status, listed = await hub.rest("GET", "/eventHubEndpoints/events/ConsumerGroups")
    assert [g["name"] for g in listed["value"]][:2] == ["$Default", "analytics"]
    device = await hub.device("eh-groups")
    partition = str(partition_of("eh-groups", 4))
    try:
        await send(device, 2, "groups-1")
        # $Default reads the first two and stops.
        first = await read_tagged(hub, "groups-1", 2, starting_position="-1", partition_id=partition)
        assert len(of_tag(first, "groups-1")) == 2
        # analytics starts after what is there; once it has read the first new message it is waiting at
        # the end of the partition, and the second reaches it live (the hub wakes it, nobody polls).
        info = await partition_props(hub, partition)
        live = hub.consumer("analytics")
        events: list = []
        first_in, second_in = asyncio.Event(), asyncio.Event()

        async def on_event(context, event):
            events.append(event)
            (second_in if len(events) >= 2 else first_in).set()

        task = asyncio.create_task(
            live.receive(
                on_event=on_event,
                starting_position=info["last_enqueued_sequence_number"],
                partition_id=partition,
            )
        )
        try:
            await send(device, 1, "groups-2a")
            await asyncio.wait_for(first_in.wait(), T)
            await send(device, 1, "groups-2b")
            await asyncio.wait_for(second_in.wait(), T)
        finally:
            await stop(live, task)
        assert [e.message_id for e in events] == ["groups-2a-0", "groups-2b-0"]
        assert events[0].sequence_number == info["last_enqueued_sequence_number"] + 1
    finally:
        await device.shutdown()
    # $Default still reads everything from the start: the groups do not share positions.
    again = await read_tagged(hub, "groups-2b", 1, starting_position="-1", partition_id=partition)
    assert len(of_tag(again, "groups-1")) == 2
    status, _ = await hub.rest("DELETE", "/eventHubEndpoints/events/ConsumerGroups/analytics")
    assert status == 200
    gone = hub.consumer("analytics", retry_total=0)
    with pytest.raises(EventHubError):
        await receive(gone, lambda got: True, starting_position="-1", partition_id=partition)


def sas(resource: str, key: str, policy: str, expiry: int) -> str:
    """A token as Event Hubs' clients sign it: the key's text, ``sr`` URL-encoded."""
    sr = urllib.parse.quote_plus(resource)
    digest = hmac.new(key.encode(), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = urllib.parse.quote_plus(base64.b64encode(digest).decode())
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn={policy}"


@pytest.mark.slow
async def test_cbs_refuses_a_wrong_key_another_hubs_token_and_an_expired_token(hub, module_emulator):
    settings = parse(hub.eventhub)
    entity = settings["EntityPath"]
    audience = f"sb://{hub.host}/{entity}"
    other = next(h for h in module_emulator.hub_hosts if h != hub.host)
    other_key = parse(module_emulator.eventhub_connection_string(other))["SharedAccessKey"]
    later, earlier = int(time.time()) + 600, int(time.time()) - 60
    wrong_key = base64.b64encode(b"x" * 32).decode()
    tokens = {
        "good": sas(audience, settings["SharedAccessKey"], "iothubowner", later),
        "wrong key": sas(audience, wrong_key, "iothubowner", later),
        "another hub's token": sas(f"sb://{other}/{other}", other_key, "iothubowner", later),
        "expired": sas(audience, settings["SharedAccessKey"], "iothubowner", earlier),
    }
    outcomes = {}
    for name, token in tokens.items():
        client = EventHubConsumerClient(
            fully_qualified_namespace=hub.host,
            eventhub_name=entity,
            consumer_group="$Default",
            credential=AzureSasCredential(token),
            connection_verify=str(hub.emulator.ca_path),
            retry_total=0,
        )
        try:
            outcomes[name] = (await client.get_eventhub_properties())["eventhub_name"]
        except AuthenticationError as exc:
            outcomes[name] = f"refused: {exc}"
        finally:
            await client.close()
    assert outcomes["good"] == entity
    assert "InvalidSignature" in outcomes["wrong key"] and "401" in outcomes["wrong key"]
    assert "InvalidSignature" in outcomes["another hub's token"]
    assert "ExpiredToken" in outcomes["expired"]


@pytest.mark.slow
async def test_the_demo_feed_reads_every_hub_through_the_built_in_endpoint(hub, module_emulator):
    """devprov_demo's live view reads like any back end: everything retained first, then only what is new."""
    device = await hub.device("eh-feed")
    feed = HubFeed(module_emulator.connection)
    try:
        await send(device, 2, "feed-1")
        seen: list = []

        async def seen_tag(tag: str, count: int):
            seen.extend(await feed.read_new())
            return len([m for m in seen if json.loads(m.body).get("tag") == tag]) == count

        await until(lambda: seen_tag("feed-1", 2), "the first two in the feed", timeout=T)
        assert feed.unreachable == {}
        mine = [m for m in seen if m.device_id == "eh-feed"]
        assert [json.loads(m.body)["i"] for m in mine] == [0, 1] and {m.hub for m in mine} == {hub.host}
        assert mine[0].seq < mine[1].seq and mine[0].enqueued_time.endswith("Z")
        seen.clear()
        await send(device, 1, "feed-2")
        await until(lambda: seen_tag("feed-2", 1), "the new one in the feed", timeout=T)
        assert [json.loads(m.body)["tag"] for m in seen if m.device_id == "eh-feed"] == ["feed-2"]
    finally:
        await feed.close()
        await device.shutdown()


# ------------------------------------------------------------------------------------ cloud-to-device
@pytest.fixture
def c2d_service(hub, tmp_path, monkeypatch):
    """A registry manager whose AMQP client (uamqp, which trusts certifi's bundle) trusts the emulator."""
    import certifi

    bundle = tmp_path / "bundle.pem"
    bundle.write_text(Path(certifi.where()).read_text() + hub.emulator.ca_pem)
    monkeypatch.setattr(certifi, "where", lambda: str(bundle))
    rm = IoTHubRegistryManager.from_connection_string(hub.emulator.hub_connection_string(hub.host))
    yield rm
    rm.amqp_svc_client.disconnect_sync()


async def inbox_of(client: IoTHubDeviceClient) -> asyncio.Queue:
    inbox: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    # The setter blocks until the SDK subscribed (and this loop serves the test): set it from a thread.
    handler = lambda m: loop.call_soon_threadsafe(inbox.put_nowait, m)  # noqa: E731
    await in_thread(setattr, client, "on_message_received", handler)
    return inbox


@pytest.mark.slow
async def test_send_c2d_message_reaches_a_connected_device_and_an_offline_one_once_it_connects(
    hub, c2d_service
):
    online = await hub.device("c2d-amqp-online")
    offline = await hub.device("c2d-amqp-offline", connect=False)
    try:
        inbox = await inbox_of(online)
        properties = {
            "messageId": "m-1",
            "correlationId": "req-7",
            "contentType": "application/json",
            "iothub-ack": "full",
            "line": "A/1",
        }
        await in_thread(c2d_service.send_c2d_message, "c2d-amqp-online", '{"cmd": "reboot"}', properties)
        received = await asyncio.wait_for(inbox.get(), T)
        assert received.data == b'{"cmd": "reboot"}'
        assert (received.message_id, received.correlation_id, received.ack) == ("m-1", "req-7", "full")
        assert received.content_type == "application/json"
        assert received.custom_properties == {"line": "A/1"}
        # The offline device's message waits in its queue until it connects.
        await in_thread(c2d_service.send_c2d_message, "c2d-amqp-offline", "later", {"messageId": "m-2"})
        await asyncio.wait_for(offline.connect(), T)
        later = await asyncio.wait_for((await inbox_of(offline)).get(), T)
        assert (later.data, later.message_id) == (b"later", "m-2")
    finally:
        await online.shutdown()
        await offline.shutdown()


@pytest.mark.slow
async def test_send_c2d_message_to_an_unknown_device_is_refused_and_the_sender_goes_on(hub, c2d_service):
    with pytest.raises(Exception, match="C2D message send failure"):
        await in_thread(c2d_service.send_c2d_message, "c2d-nobody", "hello", {})
    # The same sender then queues a message for a known (offline) device: the purge finds exactly it.
    await hub.device("c2d-amqp-queued", connect=False)
    await in_thread(c2d_service.send_c2d_message, "c2d-amqp-queued", "queued", {"messageId": "q-1"})
    status, purged = await hub.rest("DELETE", "/devices/c2d-amqp-queued/commands?api-version=2021-04-12")
    assert (status, purged["totalMessagesPurged"]) == (200, 1)


# ------------------------------------------------------------------------------------ hostile and crashes
def _raw_exchange(host: str, ca_path: str, payload: bytes) -> bytes:
    """Send ``payload`` on a TLS connection to 5671 and read until the emulator closes it."""
    context = ssl.create_default_context(cafile=ca_path)
    with (
        socket.create_connection((host, 5671), timeout=T) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(payload)
        received = b""
        while chunk := tls.recv(65536):
            received += chunk
        return received


@pytest.mark.slow
async def test_bytes_that_are_not_azure_amqp_close_the_connection_and_the_endpoint_goes_on(hub):
    ca = str(hub.emulator.ca_path)
    # sasl-init (0x41) naming PLAIN: frame header (size 21, SASL frame), then the described list
    sasl_init_plain = bytes.fromhex("0000001502010000 005341 c00801 a305") + b"PLAIN"
    cases = {
        "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "plain sasl": b"AMQP\x03\x01\x00\x00" + sasl_init_plain,
        "garbage frame": b"AMQP\x00\x01\x00\x00" + b"\x00\x00\x00\x10\x02\x00\x00\x00" + b"\xff" * 8,
        "huge frame": b"AMQP\x00\x01\x00\x00" + b"\x7f\xff\xff\xff\x02\x00\x00\x00",
    }
    answers = {
        name: await asyncio.to_thread(_raw_exchange, hub.host, ca, data) for name, data in cases.items()
    }
    assert answers["http"] == b""  # closed without an answer
    # The mechanisms offered, then sasl-outcome (0x44) with code 1 (auth failed), then closed.
    plain = answers["plain sasl"]
    assert plain.startswith(b"AMQP\x03\x01\x00\x00") and b"MSSBCBS" in plain and b"ANONYMOUS" in plain
    assert plain.endswith(b"\x00SD\xd0\x00\x00\x00\x06\x00\x00\x00\x01P\x01")
    # Undecodable: closed after the protocol header; oversized: closed with a framing error.
    assert answers["garbage frame"] == b"AMQP\x00\x01\x00\x00"
    assert answers["huge frame"].startswith(b"AMQP\x00\x01\x00\x00")
    assert b"amqp:connection:framing-error" in answers["huge frame"]
    assert (await hub_props(hub))["partition_ids"] == ["0", "1", "2", "3"]


@pytest.mark.slow
async def test_sequence_numbers_and_offsets_survive_a_kill_and_continue_without_gaps(
    emulator, tmp_path, monkeypatch
):
    """Positions are written in the messages' own transaction: what a consumer saw (and checkpointed) before
    kill -9 is numbered the same after the restart, and numbering goes on from there."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))
    hub = Hub(emulator, emulator.default_hub, tmp_path)
    device = await hub.device("eh-crash")
    partition = str(partition_of("eh-crash", 4))
    await send(device, 3, "before")
    before = await read_tagged(hub, "before", 3, starting_position="-1", partition_id=partition)
    await device.shutdown()
    emulator.kill()
    emulator.start()  # the same addresses, keys and data dir
    device = await hub.client("eh-crash")
    try:
        await send(device, 2, "after")
    finally:
        await device.shutdown()
    everything = await read_tagged(hub, "after", 2, starting_position="-1", partition_id=partition)
    assert [(e.sequence_number, e.offset) for e in everything[:3]] == [
        (e.sequence_number, e.offset) for e in before
    ]
    assert [e.sequence_number for e in everything] == [0, 1, 2, 3, 4]
    assert [e.message_id for e in everything] == [f"before-{i}" for i in range(3)] + ["after-0", "after-1"]
