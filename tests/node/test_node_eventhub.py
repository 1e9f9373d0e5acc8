"""A hub's built-in Event Hub-compatible endpoint read with Microsoft's Node.js Event Hubs SDK
(@azure/event-hubs, pinned in tests/node/package-lock.json), from the emulator's own Event Hub-compatible
connection string, its CA in NODE_EXTRA_CA_CERTS: the telemetry a device sent through azure-iot-device
(Python), from the start, after an offset, from an enqueued time, and in a second consumer group."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request

import pytest
from azure.iot.device import X509, Message
from azure.iot.device.aio import IoTHubDeviceClient
from azure.iot.hub import IoTHubRegistryManager
from support.certs import TestCa
from support.node_sdks import eventhub_client

from azure_iot_emulator.hub.eventhub.model import partition_of
from azure_iot_emulator.sas import generate_sas

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

T = 30


async def send_three(emulator, host: str, tmp_path, device_id: str) -> None:
    rm = IoTHubRegistryManager.from_connection_string(emulator.hub_connection_string(host))
    cert = TestCa().issue(tmp_path, device_id, self_signed=True)
    await asyncio.to_thread(rm.create_device_with_x509, device_id, cert.sha1, cert.sha256, "enabled")
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(cert.cert_path), str(cert.key_path)),
        hostname=host,
        device_id=device_id,
        server_verification_cert=emulator.ca_pem,
    )
    await asyncio.wait_for(client.connect(), T)
    try:
        for i in range(3):
            message = Message(json.dumps({"i": i}), message_id=f"n-{i}", content_type="application/json")
            message.custom_properties["k"] = str(i)
            await asyncio.wait_for(client.send_message(message), T)
            await asyncio.sleep(0.01)  # three distinct enqueue times
    finally:
        await client.shutdown()


def create_consumer_group(emulator, host: str, name: str) -> int:
    key = dict(p.split("=", 1) for p in emulator.hub_connection_string(host).split(";"))["SharedAccessKey"]
    token = generate_sas(host, key, policy="iothubowner", expiry=int(time.time()) + 600)
    request = urllib.request.Request(
        f"https://{host}/eventHubEndpoints/events/ConsumerGroups/{name}",
        method="PUT",
        headers={"Authorization": token},
    )
    context = ssl.create_default_context(cafile=str(emulator.ca_path))
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return response.status


async def test_node_event_hubs_reads_the_telemetry_a_python_device_sent(
    node_sdks, emulator, tmp_path, monkeypatch
):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))
    host = emulator.default_hub
    node = eventhub_client(node_sdks, emulator, host)

    await send_three(emulator, host, tmp_path, "node-eh-1")
    partition = str(partition_of("node-eh-1", 4))

    properties = await node("properties")
    assert properties["name"] == host and properties["partitionIds"] == ["0", "1", "2", "3"]
    assert properties["partitions"][partition]["lastEnqueuedSequenceNumber"] == 2

    everything = await node("read", count=3, deviceId="node-eh-1", **{"from": {"earliest": True}})
    assert [e["body"] for e in everything] == [{"i": 0}, {"i": 1}, {"i": 2}]
    first = everything[0]
    assert (first["messageId"], first["contentType"], first["deviceId"]) == (
        "n-0",
        "application/json",
        "node-eh-1",
    )
    assert first["messageSource"] == "Telemetry" and first["properties"] == {"k": "0"}
    assert [e["sequenceNumber"] for e in everything] == [0, 1, 2]

    after_first = await node(
        "read", partitionId=partition, count=2, **{"from": {"offset": everything[0]["offset"]}}
    )
    assert [e["messageId"] for e in after_first] == ["n-1", "n-2"]
    # An enqueued time is exclusive in this SDK: what was enqueued after the second.
    after_second = await node(
        "read", partitionId=partition, count=1, **{"from": {"enqueuedOn": everything[1]["enqueuedTimeUtc"]}}
    )
    assert [e["messageId"] for e in after_second] == ["n-2"]

    assert create_consumer_group(emulator, host, "node-readers") == 200
    other_group = await node(
        "read", consumerGroup="node-readers", partitionId=partition, count=3, **{"from": {"earliest": True}}
    )
    assert [e["messageId"] for e in other_group] == ["n-0", "n-1", "n-2"]
