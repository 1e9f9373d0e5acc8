"""What the SDK never sends, over a real socket to a real emulator process: the hub closes the
connection (another device's topic, QoS 2, desired written by a device, oversized telemetry), nothing is
stored, and other devices are unaffected; one connection per device id."""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import aiohttp
import pytest
from azure.iot.hub import IoTHubRegistryManager
from hub_raw_mqtt import RawMqtt
from support.certs import TestCa

from azure_iot_emulator.sas import generate_sas


@pytest.fixture
def hub(emulator, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))
    host = emulator.default_hub
    conn = dict(zip(emulator.hub_hosts, emulator.hub_connection_strings, strict=True))[host]
    return emulator, host, IoTHubRegistryManager.from_connection_string(conn)


async def register(rm, tmp_path, device_id):
    cert = TestCa().issue(tmp_path, device_id, self_signed=True)
    await asyncio.to_thread(lambda: rm.create_device_with_x509(device_id, cert.sha1, cert.sha256, "enabled"))
    return cert


async def connect(emulator, host, cert, client_id=None):
    device_id = client_id or cert.registration_id
    return await RawMqtt.connect(
        host,
        client_id=device_id,
        username=f"{host}/{device_id}/?api-version=2019-10-01",
        ca_pem=emulator.ca_pem,
        cert_path=str(cert.cert_path),
        key_path=str(cert.key_path),
    )


async def stored(emulator, device_id, top: int = 100):
    """The device's stored telemetry through the hub REST extension GET /devices/{id}/messages."""
    conn = dict(zip(emulator.hub_hosts, emulator.hub_connection_strings, strict=True))[emulator.default_hub]
    parts = dict(part.split("=", 1) for part in conn.split(";"))
    auth = generate_sas(
        parts["HostName"], parts["SharedAccessKey"], policy="iothubowner", expiry=int(time.time()) + 600
    )
    context = ssl.create_default_context(cadata=emulator.ca_pem)
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"https://{parts['HostName']}/devices/{device_id}/messages",
            params={"top": str(top)},
            headers={"Authorization": auth},
            ssl=context,
        ) as response,
    ):
        assert response.status == 200
        return await response.json()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("topic", "qos", "payload"),
    [
        ("devices/raw-b/messages/events/", 1, b"not my topic"),
        ("devices/raw-a/messages/events/", 2, b"qos two"),
        ("$iothub/twin/PATCH/properties/desired/?$rid=1", 1, b'{"x": 1}'),
        ("devices/raw-a/messages/events/", 1, b"x" * (256 * 1024 + 1)),
    ],
    ids=["other-device", "qos2", "desired-by-device", "too-large"],
)
async def test_forbidden_publish_closes_only_that_connection(hub, tmp_path, topic, qos, payload):
    emulator, host, rm = hub
    cert_a = await register(rm, tmp_path, "raw-a")
    cert_b = await register(rm, tmp_path, "raw-b")
    a, rc = await connect(emulator, host, cert_a)
    assert rc == 0
    b, rc = await connect(emulator, host, cert_b)
    assert rc == 0
    try:
        if qos == 2:
            await a.publish(topic, payload, qos=2)
        else:
            with pytest.raises((ConnectionError, TimeoutError)):
                await a.publish(topic, payload, qos=1)
        assert await a.wait_closed()
        await b.publish("devices/raw-b/messages/events/", b"still fine", qos=1)
        assert not b.closed.is_set()
    finally:
        await a.close()
        await b.close()
    assert await stored(emulator, "raw-a") == []
    assert [m["body"] for m in await stored(emulator, "raw-b")] == ["still fine"]


@pytest.mark.slow
async def test_bad_reported_patches_get_400_and_change_nothing(hub, tmp_path):
    emulator, host, rm = hub
    cert = await register(rm, tmp_path, "raw-t")
    client, rc = await connect(emulator, host, cert)
    assert rc == 0
    try:
        assert await client.subscribe("$iothub/twin/res/#") in (0, 1)
        for rid, body in (
            ("1", b"not json"),
            ("2", b"[1, 2]"),
            ("3", b'{"a.b": 1}'),
            ("4", json.dumps({"l1": {"l2": {"l3": {"l4": {"l5": {"l6": 1}}}}}}).encode()),
            ("5", json.dumps({f"k{i}": "v" * 1000 for i in range(40)}).encode()),
        ):
            await client.publish(f"$iothub/twin/PATCH/properties/reported/?$rid={rid}", body)
            answer = await asyncio.wait_for(client.messages.get(), 10)
            assert answer.topic.startswith("$iothub/twin/res/400/"), answer.topic
            assert f"$rid={rid}" in answer.topic
        await client.publish("$iothub/twin/PATCH/properties/reported/?$rid=ok", b'{"fine": true}')
        answer = await asyncio.wait_for(client.messages.get(), 10)
        assert answer.topic == "$iothub/twin/res/204/?$rid=ok&$version=2"
    finally:
        await client.close()
    twin = await asyncio.to_thread(rm.get_twin, "raw-t")
    assert {k: v for k, v in twin.properties.reported.items() if not k.startswith("$")} == {"fine": True}


async def test_second_connection_with_same_id_closes_the_first(hub, tmp_path):
    emulator, host, rm = hub
    cert = await register(rm, tmp_path, "raw-dup")
    first, rc = await connect(emulator, host, cert)
    assert rc == 0
    second, rc = await connect(emulator, host, cert)
    assert rc == 0
    try:
        assert await first.wait_closed()
        await second.publish("devices/raw-dup/messages/events/", b"second")
        assert not second.closed.is_set()
    finally:
        await first.close()
        await second.close()


async def test_unknown_device_and_client_id_mismatch_refused(hub, tmp_path):
    emulator, host, rm = hub
    cert = await register(rm, tmp_path, "raw-k")
    stranger = TestCa().issue(tmp_path, "raw-unknown", self_signed=True)
    refused, rc = await connect(emulator, host, stranger)
    assert rc == 5
    await refused.close()
    client, rc = await RawMqtt.connect(
        host,
        client_id="raw-k",
        username=f"{host}/someone-else/?api-version=2019-10-01",
        ca_pem=emulator.ca_pem,
        cert_path=str(cert.cert_path),
        key_path=str(cert.key_path),
    )
    assert rc == 5
    await client.close()
    client, rc = await RawMqtt.connect(
        host,
        client_id="raw-k",
        username=f"{host}/raw-k/?api-version=2019-10-01",
        ca_pem=emulator.ca_pem,
    )
    assert rc == 5  # no client certificate
    await client.close()


@pytest.mark.slow
async def test_method_without_response_is_504_and_late_answer_ignored(hub, tmp_path):
    from azure.iot.hub.models import CloudToDeviceMethod
    from msrest.exceptions import HttpOperationError

    emulator, host, rm = hub
    cert = await register(rm, tmp_path, "raw-m")
    client, rc = await connect(emulator, host, cert)
    assert rc == 0
    try:
        await client.subscribe("$iothub/methods/POST/#")
        call = asyncio.create_task(
            asyncio.to_thread(
                rm.invoke_device_method,
                "raw-m",
                CloudToDeviceMethod(method_name="slow", payload={"a": 1}, response_timeout_in_seconds=5),
            )
        )
        request = await asyncio.wait_for(client.messages.get(), 10)
        assert request.topic.startswith("$iothub/methods/POST/slow/?$rid=")
        assert json.loads(request.payload) == {"a": 1}
        with pytest.raises(HttpOperationError) as info:
            await asyncio.wait_for(call, 30)
        assert info.value.response.status_code == 504
        rid = request.topic.split("$rid=", 1)[1]
        await client.publish(f"$iothub/methods/res/200/?$rid={rid}", b'{"late": true}')
        assert not client.closed.is_set()
    finally:
        await client.close()


async def test_device_of_one_hub_is_refused_by_another(hub, tmp_path):
    emulator, host, rm = hub
    other = next(h for h in emulator.hub_hosts if h != host)
    cert = await register(rm, tmp_path, "raw-h")
    client, rc = await RawMqtt.connect(
        other,
        client_id="raw-h",
        username=f"{other}/raw-h/?api-version=2019-10-01",
        ca_pem=emulator.ca_pem,
        cert_path=str(cert.cert_path),
        key_path=str(cert.key_path),
    )
    assert rc == 5
    await client.close()
