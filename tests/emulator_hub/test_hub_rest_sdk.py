"""The hub service REST app on real HTTPS, driven by azure-iot-hub's IoTHubRegistryManager (unchanged)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import urllib.request
from datetime import UTC, datetime

import pytest
from aiohttp import web
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties
from conftest import free_loopback_address
from msrest.exceptions import HttpOperationError
from support.certs import TestCa

from azure_iot_emulator.hub.c2d import C2dMessage
from azure_iot_emulator.hub.registry import HubRegistry
from azure_iot_emulator.hub.rest import build_hub_rest_app
from azure_iot_emulator.hub.service import HubService
from azure_iot_emulator.hub.telemetry import TelemetryStore
from azure_iot_emulator.hub.topics import PropertyBag
from azure_iot_emulator.sas import generate_sas
from azure_iot_emulator.store import Database


def now():
    return datetime.now(UTC)


@pytest.fixture
async def hub_rest(tmp_path, monkeypatch):
    host = free_loopback_address((0,))
    pki = TestCa().server(tmp_path, [host])
    db = Database(tmp_path / "emulator.db")
    registry = HubRegistry(db, [host], now)
    service = HubService(registry, TelemetryStore(db, now), now)
    key = base64.b64encode(os.urandom(32)).decode()
    app = build_hub_rest_app(service, host, lambda: {"iothubowner": key})
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert_path, pki.key_path)
    site = web.TCPSite(runner, host, 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_path))
    conn = f"HostName={host}:{port};SharedAccessKeyName=iothubowner;SharedAccessKey={key}"
    yield {
        "conn": conn,
        "service": service,
        "registry": registry,
        "host": host,
        "port": port,
        "pki": pki,
        "tmp": tmp_path,
        "key": key,
    }
    await runner.cleanup()
    db.close()


async def call(fn, *args):
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), 30)


async def test_device_crud_with_etags(hub_rest):
    rm = IoTHubRegistryManager.from_connection_string(hub_rest["conn"])
    cert = TestCa().issue(hub_rest["tmp"], "dev-001", self_signed=True)
    created = await call(lambda: rm.create_device_with_x509("dev-001", cert.sha1, cert.sha256, "enabled"))
    assert created.device_id == "dev-001" and created.authentication.type == "selfSigned"
    assert created.authentication.x509_thumbprint.primary_thumbprint == cert.sha1
    with pytest.raises(HttpOperationError) as info:
        await call(lambda: rm.create_device_with_x509("dev-001", cert.sha1, cert.sha256, "enabled"))
    assert info.value.response.status_code == 409
    got = await call(rm.get_device, "dev-001")
    assert got.connection_state == "Disconnected" and got.etag == created.etag
    with pytest.raises(HttpOperationError) as info:
        await call(
            lambda: rm.update_device_with_x509("dev-001", "wrong-etag", cert.sha1, cert.sha256, "disabled")
        )
    assert info.value.response.status_code == 412
    assert (await call(rm.get_device, "dev-001")).status == "enabled"
    updated = await call(
        lambda: rm.update_device_with_x509("dev-001", got.etag, cert.sha1, cert.sha256, "disabled")
    )
    assert updated.status == "disabled" and updated.etag != got.etag
    devices = await call(rm.get_devices)
    assert [d.device_id for d in devices] == ["dev-001"]
    await call(rm.delete_device, "dev-001")
    with pytest.raises(HttpOperationError) as info:
        await call(rm.get_device, "dev-001")
    assert info.value.response.status_code == 404
    assert info.value.response.headers["iothub-errorcode"] == "DeviceNotFound"
    assert json.loads(info.value.response.text)["Message"].startswith("ErrorCode:DeviceNotFound;")
    with pytest.raises(HttpOperationError) as info:
        await call(rm.delete_device, "dev-001")
    assert info.value.response.status_code == 404


async def test_twin_get_update_with_etag_replace_and_query(hub_rest):
    rm = IoTHubRegistryManager.from_connection_string(hub_rest["conn"])
    hub_rest["registry"].provision_from_dps(
        hub=hub_rest["host"],
        device_id="dev-002",
        thumbprint_sha1="AA" * 20,
        thumbprint_sha256="BB" * 32,
        initial_twin={"tags": {"line": "A"}, "properties": {"desired": {"fw": "1.0"}}},
        apply_initial_twin=True,
    )
    twin = await call(rm.get_twin, "dev-002")
    assert twin.tags == {"line": "A"}
    assert twin.properties.desired["fw"] == "1.0" and twin.properties.desired["$version"] == 2
    patch = Twin(
        tags={"line": None, "site": "X"}, properties=TwinProperties(desired={"fw": "2.0", "mode": "eco"})
    )
    with pytest.raises(HttpOperationError) as info:
        await call(rm.update_twin, "dev-002", patch, "AAAAAAAAAAA=")
    assert info.value.response.status_code == 412
    assert (await call(rm.get_twin, "dev-002")).properties.desired["fw"] == "1.0"
    updated = await call(rm.update_twin, "dev-002", patch, twin.etag)
    assert updated.tags == {"site": "X"}
    assert updated.properties.desired["fw"] == "2.0" and updated.properties.desired["$version"] == 3
    assert updated.properties.desired["$metadata"]["fw"]["$lastUpdatedVersion"] == 3
    assert updated.etag != twin.etag and updated.version == twin.version + 1
    # sending back the fetched twin (with $metadata/$version, deviceId, etag ...) is accepted
    again = await call(rm.update_twin, "dev-002", updated)
    assert again.properties.desired["mode"] == "eco"
    bad = Twin(properties=TwinProperties(desired={"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}))
    with pytest.raises(HttpOperationError) as info:
        await call(rm.update_twin, "dev-002", bad)
    assert info.value.response.status_code == 400
    replaced = await call(
        rm.replace_twin, "dev-002", Twin(tags={"t": 1}, properties=TwinProperties(desired={"only": True}))
    )
    assert replaced.tags == {"t": 1} and replaced.properties.desired["only"] is True
    assert "fw" not in replaced.properties.desired
    from azure.iot.hub.models import QuerySpecification

    result = await call(rm.query_iot_hub, QuerySpecification(query="SELECT * FROM devices"))
    assert [item.device_id for item in result.items] == ["dev-002"]
    assert result.items[0].connection_state == "Disconnected"
    result = await call(
        rm.query_iot_hub, QuerySpecification(query="SELECT * FROM devices WHERE tags.t = 'x'")
    )
    assert result.items == []


async def test_purge_empties_the_c2d_queue_and_answers_the_count(hub_rest):
    rm = IoTHubRegistryManager.from_connection_string(hub_rest["conn"])
    service, host = hub_rest["service"], hub_rest["host"]
    await call(lambda: rm.create_device_with_sas("dev-c2d", "", "", "enabled"))
    for body in (b"a", b"b", b"c"):
        await service.send_c2d(host, "dev-c2d", C2dMessage(body))
    assert (await call(rm.get_device, "dev-c2d")).cloud_to_device_message_count == 3
    assert (await call(rm.get_twin, "dev-c2d")).cloud_to_device_message_count == 3
    purge = rm.protocol.cloud_to_device_messages.purge_cloud_to_device_message_queue
    result = await call(purge, "dev-c2d")
    assert (result.device_id, result.total_messages_purged, result.module_id) == ("dev-c2d", 3, None)
    assert (await call(rm.get_device, "dev-c2d")).cloud_to_device_message_count == 0
    assert (await call(purge, "dev-c2d")).total_messages_purged == 0
    with pytest.raises(HttpOperationError) as info:
        await call(purge, "nobody")
    assert info.value.response.status_code == 404
    assert info.value.response.headers["iothub-errorcode"] == "DeviceNotFound"


async def test_method_to_offline_device_is_404(hub_rest):
    rm = IoTHubRegistryManager.from_connection_string(hub_rest["conn"])
    hub_rest["registry"].provision_from_dps(
        hub=hub_rest["host"],
        device_id="dev-003",
        thumbprint_sha1="AA" * 20,
        thumbprint_sha256="BB" * 32,
        initial_twin=None,
        apply_initial_twin=False,
    )
    with pytest.raises(HttpOperationError) as info:
        await call(rm.invoke_device_method, "dev-003", CloudToDeviceMethod(method_name="ping", payload={}))
    assert info.value.response.status_code == 404
    assert info.value.response.headers["iothub-errorcode"] == "DeviceNotOnline"
    with pytest.raises(HttpOperationError) as info:
        await call(rm.invoke_device_method, "nobody", CloudToDeviceMethod(method_name="ping", payload={}))
    assert info.value.response.status_code == 404


def _get(url, ca_path, headers):
    context = ssl.create_default_context(cafile=str(ca_path))
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_bad_sas_is_401_and_messages_endpoint(hub_rest):
    base = f"https://{hub_rest['host']}:{hub_rest['port']}"
    hub_rest["registry"].provision_from_dps(
        hub=hub_rest["host"],
        device_id="dev-004",
        thumbprint_sha1="AA" * 20,
        thumbprint_sha256="BB" * 32,
        initial_twin=None,
        apply_initial_twin=False,
    )
    await hub_rest["service"].ingest(
        hub_rest["host"], "dev-004", PropertyBag({"messageId": "m1"}, {"k": "v"}), b'{"t":1}'
    )
    good = generate_sas(
        f"{hub_rest['host']}:{hub_rest['port']}",
        hub_rest["key"],
        policy="iothubowner",
        expiry=int(now().timestamp()) + 600,
    )
    expired = generate_sas("x", hub_rest["key"], policy="iothubowner", expiry=int(now().timestamp()) - 1)
    wrong = generate_sas(
        "x", base64.b64encode(b"k" * 32).decode(), policy="iothubowner", expiry=int(now().timestamp()) + 600
    )
    url = f"{base}/devices/dev-004/messages?top=5&api-version=2021-04-12"
    for headers in ({}, {"Authorization": expired}, {"Authorization": wrong}):
        status, body = await asyncio.to_thread(_get, url, hub_rest["pki"].ca_path, headers)
        assert status == 401 and body["Message"].startswith("ErrorCode:IotHubUnauthorizedAccess")
    status, body = await asyncio.to_thread(_get, url, hub_rest["pki"].ca_path, {"Authorization": good})
    assert status == 200
    assert body[0]["body"] == {"t": 1} and body[0]["properties"] == {"k": "v"}
    assert body[0]["systemProperties"] == {"messageId": "m1"} and body[0]["enqueuedTimeUtc"].endswith("Z")


async def test_the_hub_is_tailed_after_a_sequence_number(hub_rest):
    """``GET /messages?after=N`` (an emulator extension): every device of this hub, oldest first, at most
    ``top``, then only what came since; a bad ``after`` is 400 and no SAS is 401."""
    service, host = hub_rest["service"], hub_rest["host"]
    for n in range(3):
        for device in ("dev-a", "dev-b"):
            await service.ingest(host, device, PropertyBag(), json.dumps({"n": n}).encode())
    base = f"https://{host}:{hub_rest['port']}"
    token = generate_sas(host, hub_rest["key"], policy="iothubowner", expiry=int(now().timestamp()) + 600)

    async def page(after: int, top: int) -> list:
        url = f"{base}/messages?after={after}&top={top}"
        status, body = await asyncio.to_thread(_get, url, hub_rest["pki"].ca_path, {"Authorization": token})
        assert status == 200
        return body

    first = await page(0, 4)
    rest = await page(first[-1]["sequenceNumber"], 4)
    assert [(m["deviceId"], m["body"]["n"]) for m in first + rest] == [
        (device, n) for n in range(3) for device in ("dev-a", "dev-b")
    ]
    assert await page(rest[-1]["sequenceNumber"], 4) == []
    token = generate_sas(host, hub_rest["key"], policy="iothubowner", expiry=int(now().timestamp()) + 600)
    for after in ("-1", "x", "1" * 19):
        url = f"{base}/messages?after={after}"
        status, body = await asyncio.to_thread(_get, url, hub_rest["pki"].ca_path, {"Authorization": token})
        assert status == 400 and body["Message"].startswith("ErrorCode:ArgumentInvalid")
    status, _ = await asyncio.to_thread(_get, f"{base}/messages", hub_rest["pki"].ca_path, {})
    assert status == 401


def _send(method, url, ca_path, headers, body=None):
    context = ssl.create_default_context(cafile=str(ca_path))
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={**headers, "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


async def test_bad_bodies_are_400_and_query_pages(hub_rest):
    base = f"https://{hub_rest['host']}:{hub_rest['port']}"
    auth = {
        "Authorization": generate_sas(
            f"{hub_rest['host']}:{hub_rest['port']}",
            hub_rest["key"],
            policy="iothubowner",
            expiry=int(now().timestamp()) + 600,
        )
    }
    for i in range(5):
        hub_rest["registry"].provision_from_dps(
            hub=hub_rest["host"],
            device_id=f"q-{i}",
            thumbprint_sha1="AA" * 20,
            thumbprint_sha256="BB" * 32,
            initial_twin=None,
            apply_initial_twin=False,
        )
    ca = hub_rest["pki"].ca_path
    cases = [
        ("PUT", "/devices/new-1", {"deviceId": "other"}),
        ("PUT", "/devices/new-1", {"authentication": {"type": "selfSigned"}}),
        ("PATCH", "/twins/q-0", ["not", "an", "object"]),
        ("PATCH", "/twins/q-0", {"tags": {"bad key": 1}}),
        ("PATCH", "/twins/q-0", {"properties": {"reported": {"x": 1}}}),
        ("POST", "/twins/q-0/methods", {"payload": {}}),
        ("POST", "/twins/q-0/methods", {"methodName": "m", "responseTimeoutInSeconds": 1}),
        ("POST", "/devices/query", {"query": "DROP TABLE devices"}),
    ]
    before = await asyncio.to_thread(_send, "GET", f"{base}/twins/q-0", ca, auth)
    for method, path, body in cases:
        status, headers, answer = await asyncio.to_thread(_send, method, base + path, ca, auth, body)
        assert status == 400, (method, path, status, answer)
        assert headers["iothub-errorcode"] == "ArgumentInvalid" and "Retry-After" not in headers
    after = await asyncio.to_thread(_send, "GET", f"{base}/twins/q-0", ca, auth)
    assert after[2] == before[2]
    assert (await asyncio.to_thread(_send, "GET", f"{base}/devices/new-1", ca, auth))[0] == 404
    seen, continuation = [], None
    while True:
        headers = {**auth, "x-ms-max-item-count": "2"}
        if continuation:
            headers["x-ms-continuation"] = continuation
        status, response_headers, page = await asyncio.to_thread(
            _send, "POST", f"{base}/devices/query", ca, headers, {"query": "SELECT * FROM devices"}
        )
        assert status == 200 and len(page) <= 2
        seen += [twin["deviceId"] for twin in page]
        continuation = response_headers.get("x-ms-continuation")
        if not continuation:
            break
    assert seen == [f"q-{i}" for i in range(5)]
