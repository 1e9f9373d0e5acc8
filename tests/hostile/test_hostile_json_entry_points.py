"""Every hostile JSON shape (tests/support/hostile_json.py) against every entry point that reads JSON from
outside, each a real server on loopback with a real client: activation_svc's Activate (gRPC, mTLS, generated
stubs), the portal (aiohttp), the emulator's hub and DPS service REST APIs (raw HTTPS with a SAS, since the
SDKs cannot send such bodies), the hub's device MQTT (reported properties) and DPS registration (MQTT and
the device HTTPS API), the portal's shipment upload (its metadata for every row), and activation_svc's
allocation webhook in group mode (the device's payload in DPS's AllocationRequest).

Each check asserts the entry point's own refusal (gRPC INVALID_ARGUMENT with its reason, the portal's form
again, Azure's 400 error body, a twin or DPS response with an error status), that nothing changed, and that
the connection still answers.  A body larger than what the entry point takes at all gets its size refusal
instead (413, the portal's "Too large" page).

A new entry point is one more ``Target`` in ``TARGETS``; a new shape is one more line in ``SHAPES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import aiohttp
import grpc
import pytest
import pytest_asyncio
from activation.group_env import META, Stack, runtime_context, sha256_of
from aiohttp.test_utils import TestClient, TestServer
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    dps_enrollment,
    enrolled,
    factory_env,
    failure,
    running_activation,
    running_factory,
)
from portal.portal_env import activate_form, hidden_fields, portal_stack
from support.certs import TestCa
from support.dps_device import x509_enrollment
from support.hostile_json import SHAPES, Hostile, shape_id
from support.mqtt_client import MqttTestClient, client_context

from activation_svc.allocation.http import MAX_BODY as MAX_ALLOCATION_BODY
from activation_svc.portal.app import create_app
from activation_svc.portal.pages import MAX_METADATA_CHARS
from azure_iot_emulator.sas import generate_sas
from devprov.v1 import activation_service_pb2 as apb

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = 30


class Target(Protocol):
    async def refuses(self, shape: Hostile) -> None:
        """Send ``shape``; assert the refusal, that nothing changed, that the entry point still answers."""


def _in(template: str) -> Callable[[bytes], bytes]:
    """A body template: ``template`` with ``%`` where the hostile value goes."""
    head, tail = template.encode().split(b"%")
    return lambda value: head + value + tail


# ------------------------------------------------------------------------------------------ activation
class GrpcActivate:
    template = staticmethod(_in('{"tags": {"k": %}, "properties": {"desired": {"x": 1}}}'))

    def __init__(self, emulator: Any, activation: Any, device_id: str, code: str) -> None:
        self.emulator, self.activation, self.device_id, self.code = emulator, activation, device_id, code

    async def refuses(self, shape: Hostile) -> None:
        before = await dps_enrollment(self.emulator, self.device_id)
        text = shape.body(self.template).decode("utf-8")
        details = await failure(self.activation.Activate(activate_request(self.device_id, self.code, text)))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.reason == ("METADATA_NOT_JSON" if shape.syntax else "METADATA_INVALID"), details
        if shape.reason is not None:
            assert details.metadata["json_problem"] == shape.reason
        assert [v.field for v in details.field_violations] == ["metadata_json"]
        status = await self.activation.GetDeviceStatus(
            apb.GetDeviceStatusRequest(device_id=self.device_id, activation_code=self.code)
        )
        assert status.lifecycle == apb.LIFECYCLE_ENROLLED and status.provisioning_status == "disabled"
        assert (await dps_enrollment(self.emulator, self.device_id))["etag"] == before["etag"]


@contextlib.asynccontextmanager
async def grpc_activate(emulator: Any, folder: Any) -> AsyncIterator[Target]:
    tls = OemTls.create(folder / "oem-tls")
    async with (
        running_factory(factory_env(folder, emulator)) as (_, factory),
        running_activation(activation_env(folder, emulator, tls), tls) as (_, activation),
    ):
        device, code = await enrolled(factory, folder)
        yield GrpcActivate(emulator, activation, device.device_id, code)


class PortalActivate:
    template = staticmethod(GrpcActivate.template)

    def __init__(self, stack: Any, client: TestClient, device_id: str, code: str) -> None:
        self.stack, self.client, self.device_id, self.code = stack, client, device_id, code

    async def refuses(self, shape: Hostile) -> None:
        before = await self.stack.enrollment(self.device_id)
        page = await (await self.client.get("/")).text()
        fields = activate_form(hidden_fields(page), self.device_id, self.code, "")
        metadata = shape.body(self.template)  # bytes: a form carries them percent-encoded
        body = urllib.parse.urlencode({**fields, "metadata": metadata}).encode("ascii")
        response = await self.client.post(
            "/activate", data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        page = await response.text()
        if len(body) > self.stack.settings.max_body_bytes:
            assert response.status == 413 and "Too large" in page
        else:
            assert response.status == 400, page
            assert '<form method="post" action="/activate"' in page  # the form again ...
            problem = re.search(r'id="problem"[^>]*>(.*?)</section>', page, re.S)
            assert problem is not None
            if len(metadata) > MAX_METADATA_CHARS:  # ... naming the field that is too long, saying how
                assert "Metadata" in problem.group(1)
                said = re.search(r'id="metadata-error"[^>]*>(.*?)</div>', page, re.S)
                assert said is not None and "at most" in said.group(1)
            elif not shape.utf8:  # ... saying the form could not be read
                assert "FORM_NOT_UTF8" in problem.group(1)
            else:  # ... with the service's reason
                reason = "METADATA_NOT_JSON" if shape.syntax else "METADATA_INVALID"
                assert reason in problem.group(1)
                assert re.search(r'id="metadata"[^>]*aria-invalid="true"', page)
        status = await self.stack.status(self.device_id, self.code)
        assert status.lifecycle == apb.LIFECYCLE_ENROLLED and status.provisioning_status == "disabled"
        assert (await self.stack.enrollment(self.device_id))["etag"] == before["etag"]


@contextlib.asynccontextmanager
async def portal_activate(emulator: Any, folder: Any) -> AsyncIterator[Target]:
    async with (
        portal_stack(folder, emulator) as stack,
        TestClient(TestServer(create_app(stack.settings))) as client,
    ):
        device, code = await stack.enrolled()
        yield PortalActivate(stack, client, device.device_id, code)


class PortalBatchMetadata:
    """The portal's shipment upload (/batch) with one metadata JSON for every row: refused as a whole."""

    template = staticmethod(GrpcActivate.template)

    def __init__(self, stack: Any, client: TestClient, device_id: str, code: str) -> None:
        self.stack, self.client, self.device_id, self.code = stack, client, device_id, code

    async def refuses(self, shape: Hostile) -> None:
        before = await self.stack.enrollment(self.device_id)
        page = await (await self.client.get("/batch")).text()
        # built by hand: aiohttp's FormData would send bytes as a file, not as the form's text field
        boundary = uuid.uuid4().hex
        parts = (
            ('name="csrf_token"', hidden_fields(page)["csrf_token"].encode()),
            (
                'name="shipment"; filename="shipment.csv"',
                f"guid,code\n{self.device_id},{self.code}\n".encode(),
            ),
            ('name="metadata"', shape.body(self.template)),
        )
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Disposition: form-data; {head}\r\n\r\n".encode() + value + b"\r\n"
                for head, value in parts
            )
            + f"--{boundary}--\r\n".encode()
        )
        response = await self.client.post(
            "/batch", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        page = await response.text()
        if response.status == 413:  # larger than the portal takes at all
            assert "Too large" in page
        else:
            assert response.status == 400, page
            problem = re.search(r'id="problem"[^>]*>(.*?)</section>', page, re.S)
            assert problem is not None, page
            if not shape.utf8:
                assert "FORM_NOT_UTF8" in problem.group(1)
            else:
                assert "SHIPMENT_UNUSABLE" in problem.group(1)
                if shape.reason is not None:
                    assert f"[{shape.reason}]" in problem.group(1)
        after = await self.stack.enrollment(self.device_id)
        assert after["etag"] == before["etag"] and after["provisioningStatus"] == "disabled"


@contextlib.asynccontextmanager
async def portal_batch(emulator: Any, folder: Any) -> AsyncIterator[Target]:
    async with (
        portal_stack(folder, emulator) as stack,
        TestClient(TestServer(create_app(stack.settings))) as client,
    ):
        device, code = await stack.enrolled()
        yield PortalBatchMetadata(stack, client, device.device_id, code)


# ------------------------------------------------------------------------------------- emulator REST
class Rest:
    """Raw HTTPS to one of the emulator's service REST APIs, with a SAS of its owner policy."""

    def __init__(self, session: aiohttp.ClientSession, connection_string: str, policy: str) -> None:
        parts = dict(part.split("=", 1) for part in connection_string.split(";"))
        self.session, self.policy = session, policy
        self.host, self.key = parts["HostName"], parts["SharedAccessKey"]

    async def call(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        sas = generate_sas(self.host, self.key, policy=self.policy, expiry=int(time.time()) + 600)
        async with self.session.request(
            method,
            f"https://{self.host}{path}",
            params={"api-version": "2021-10-01"},
            data=body,
            headers={"Authorization": sas, "Content-Type": "application/json", **(headers or {})},
        ) as response:
            text = await response.text()
            return response.status, dict(response.headers), json.loads(text) if text else None


class HubRest:
    """A hub REST route: 400 ArgumentInvalid in Azure's envelope, the device and its twin unchanged."""

    def __init__(self, rest: Rest, device_id: str, method: str, path: str, template: str) -> None:
        self.rest, self.device_id, self.method = rest, device_id, method
        self.path, self.template = path.replace("{id}", device_id), _in(template)

    async def refuses(self, shape: Hostile) -> None:
        status, _, before = await self.rest.call("GET", f"/twins/{self.device_id}")
        assert status == 200
        new_id = f"new-{uuid.uuid4()}"
        body = shape.body(self.template).replace(b"NEW_ID", new_id.encode())
        path = self.path.replace("NEW_ID", new_id)
        status, headers, answer = await self.rest.call(self.method, path, body, {"If-Match": "*"})
        assert status == 400, answer
        assert headers["iothub-errorcode"] == "ArgumentInvalid"
        assert answer["Message"].startswith("ErrorCode:ArgumentInvalid;")
        assert answer["ExceptionMessage"].startswith("Tracking ID:")
        status, _, after = await self.rest.call("GET", f"/twins/{self.device_id}")
        assert status == 200 and (after["etag"], after["version"]) == (before["etag"], before["version"])
        assert after["tags"] == before["tags"]
        assert (await self.rest.call("GET", f"/devices/{new_id}"))[0] == 404


def _device_body(device_id: str, thumbprint: str = "AB" * 20) -> bytes:
    auth = {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": thumbprint}}
    return json.dumps({"deviceId": device_id, "status": "enabled", "authentication": auth}).encode()


@contextlib.asynccontextmanager
async def rest_session(emulator: Any) -> AsyncIterator[aiohttp.ClientSession]:
    context = ssl.create_default_context(cadata=emulator.ca_pem)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


def hub_rest(method: str, path: str, template: str) -> Callable[[Any, Any], Any]:
    @contextlib.asynccontextmanager
    async def target(emulator: Any, folder: Any) -> AsyncIterator[Target]:
        async with rest_session(emulator) as session:
            rest = Rest(session, emulator.hub_connection_string(emulator.default_hub), "iothubowner")
            device_id = f"hostile-{uuid.uuid4()}"
            assert (await rest.call("PUT", f"/devices/{device_id}", _device_body(device_id)))[0] == 200
            status, _, _ = await rest.call(
                "PATCH", f"/twins/{device_id}", b'{"tags": {"before": 1}}', {"If-Match": "*"}
            )
            assert status == 200
            yield HubRest(rest, device_id, method, path, template)

    return target


class DpsRest:
    """A DPS service REST route: 400 with Azure's DPS error body; no enrollment created."""

    max_body = 256 * 1024

    def __init__(self, rest: Rest, pem: str, method: str, path: str, template: str) -> None:
        self.rest, self.method, self.path = rest, method, path
        enrollment = json.dumps(x509_enrollment("NEW_ID", pem, initialTwin={"tags": {"k": "VALUE"}}))
        self.template = _in(template.replace("ENROLLMENT", enrollment).replace('"VALUE"', "%"))

    async def refuses(self, shape: Hostile) -> None:
        new_id = f"new-{uuid.uuid4()}"
        body = shape.body(self.template).replace(b"NEW_ID", new_id.encode())
        status, headers, answer = await self.rest.call(self.method, self.path.replace("NEW_ID", new_id), body)
        if len(body) > self.max_body:
            assert status == 413 and answer["errorCode"] == 413001
        else:
            assert status == 400, answer
            assert answer["errorCode"] == 400004 and headers["x-ms-error-code"] == "400004"
        assert set(answer) == {"errorCode", "trackingId", "message", "timestampUtc", "info"}
        assert (await self.rest.call("GET", f"/enrollments/{new_id}"))[0] == 404


def dps_rest(method: str, path: str, template: str) -> Callable[[Any, Any], Any]:
    @contextlib.asynccontextmanager
    async def target(emulator: Any, folder: Any) -> AsyncIterator[Target]:
        async with rest_session(emulator) as session:
            rest = Rest(session, emulator.dps_connection_string, "provisioningserviceowner")
            pem = TestCa().issue(folder, "hostile-dps").pem
            yield DpsRest(rest, pem, method, path, template)

    return target


# ------------------------------------------------------------------------------------- emulator MQTT
class HubDevice:
    """A device connected to the default hub over raw MQTT (twin responses and method requests
    subscribed), and the hub's REST API."""

    def __init__(self, client: MqttTestClient, rest: Rest, device_id: str) -> None:
        self.client, self.rest, self.device_id = client, rest, device_id

    async def twin(self) -> dict[str, Any]:
        """The device's twin GET (also: the connection still answers)."""
        rid = uuid.uuid4().hex
        await self.client.publish(f"$iothub/twin/GET/?$rid={rid}", b" ")
        answer = await self.client.next_publish(TIMEOUT)
        assert answer.topic == f"$iothub/twin/res/200/?$rid={rid}", answer.topic
        return json.loads(answer.payload)


@contextlib.asynccontextmanager
async def hub_device(emulator: Any, folder: Any) -> AsyncIterator[HubDevice]:
    host = emulator.default_hub
    device_id = f"hostile-{uuid.uuid4()}"
    cert = TestCa().issue(folder, device_id, self_signed=True)
    async with rest_session(emulator) as session:
        rest = Rest(session, emulator.hub_connection_string(host), "iothubowner")
        status, _, _ = await rest.call("PUT", f"/devices/{device_id}", _device_body(device_id, cert.sha1))
        assert status == 200
        context = client_context(emulator.ca_pem, str(cert.cert_path), str(cert.key_path))
        client, ack = await MqttTestClient.connect(
            host, context, client_id=device_id, username=f"{host}/{device_id}/?api-version=2019-10-01"
        )
        try:
            assert ack.return_code == 0
            await client.subscribe("$iothub/twin/res/#")
            await client.subscribe("$iothub/methods/POST/#")
            yield HubDevice(client, rest, device_id)
        finally:
            await client.close()


class OnHubDevice:
    template = staticmethod(_in('{"k": %}'))

    def __init__(self, device: HubDevice) -> None:
        self.device = device


def on_hub_device(kind: Callable[[HubDevice], Target]) -> Callable[[Any, Any], Any]:
    @contextlib.asynccontextmanager
    async def target(emulator: Any, folder: Any) -> AsyncIterator[Target]:
        async with hub_device(emulator, folder) as device:
            yield kind(device)

    return target


class HubReportedMqtt(OnHubDevice):
    """A device's reported-properties patch: ``$iothub/twin/res/400``, the twin unchanged, the same
    connection still answering a twin GET."""

    async def refuses(self, shape: Hostile) -> None:
        before = await self.device.twin()
        rid = uuid.uuid4().hex
        await self.device.client.publish(
            f"$iothub/twin/PATCH/properties/reported/?$rid={rid}", shape.body(self.template)
        )
        answer = await self.device.client.next_publish(TIMEOUT)
        assert answer.topic == f"$iothub/twin/res/400/?$rid={rid}", answer.topic
        assert json.loads(answer.payload)["errorCode"] == 400004
        assert await self.device.twin() == before  # and the connection is still up


class HubMethodResponseMqtt(OnHubDevice):
    """A device answering a direct method with hostile JSON: not JSON the hub passes on, so the service
    gets it as text (as any non-JSON answer), 200 with the device's status, never a 5xx or a dropped
    connection; the twin unchanged."""

    async def refuses(self, shape: Hostile) -> None:
        before = await self.device.twin()
        call = {"methodName": "m", "payload": {}, "responseTimeoutInSeconds": TIMEOUT}
        path = f"/twins/{self.device.device_id}/methods"
        invoke = asyncio.create_task(self.device.rest.call("POST", path, json.dumps(call).encode()))
        request = await self.device.client.next_publish(TIMEOUT)
        assert request.topic.startswith("$iothub/methods/POST/m/?$rid="), request.topic
        rid = request.topic.split("$rid=", 1)[1]
        body = shape.body(self.template)
        await self.device.client.publish(f"$iothub/methods/res/201/?$rid={rid}", body)
        status, _, answer = await invoke
        assert status == 200, answer
        if shape.reason is None:  # JSON the hub passes on as JSON
            assert answer == {"status": 201, "payload": json.loads(body)}
        else:
            assert answer == {"status": 201, "payload": body.decode("utf-8", errors="replace")}
        assert await self.device.twin() == before  # and the connection is still up


class DpsRegisterMqtt:
    """A device's DPS register request: ``$dps/registrations/res/400`` (413 past DPS's 96 KB) with Azure's
    error body; no registration recorded; the same connection still answering."""

    max_body = 96 * 1024

    def __init__(self, client: MqttTestClient, registration_id: str, rest: Rest) -> None:
        self.client, self.registration_id, self.rest = client, registration_id, rest
        self.template = _in(f'{{"registrationId": "{registration_id}", "payload": %}}')

    async def refuses(self, shape: Hostile) -> None:
        rid = uuid.uuid4().hex
        body = shape.body(self.template)
        await self.client.publish(f"$dps/registrations/PUT/iotdps-register/?$rid={rid}", body)
        answer = await self.client.next_publish(TIMEOUT)
        status = 413 if len(body) > self.max_body else 400
        assert answer.topic == f"$dps/registrations/res/{status}/?$rid={rid}", answer.topic
        assert json.loads(answer.payload)["errorCode"] == status * 1000 + (1 if status == 413 else 4)
        assert (await self.rest.call("GET", f"/registrations/{self.registration_id}"))[0] == 404
        rid = uuid.uuid4().hex  # the connection still answers: an unknown operation is a 404
        await self.client.publish(
            f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId=none", b" "
        )
        answer = await self.client.next_publish(TIMEOUT)
        assert answer.topic == f"$dps/registrations/res/404/?$rid={rid}", answer.topic


@contextlib.asynccontextmanager
async def dps_register_mqtt(emulator: Any, folder: Any) -> AsyncIterator[Target]:
    registration_id = f"hostile-{uuid.uuid4()}"
    cert = TestCa().issue(folder, registration_id)
    context = client_context(emulator.ca_pem, str(cert.cert_path), str(cert.key_path))
    client, ack = await MqttTestClient.connect(
        emulator.dps_host,
        context,
        client_id=registration_id,
        username=f"{emulator.id_scope}/registrations/{registration_id}/api-version=2019-03-31",
    )
    try:
        assert ack.return_code == 0
        await client.subscribe("$dps/registrations/res/#")
        async with rest_session(emulator) as session:
            rest = Rest(session, emulator.dps_connection_string, "provisioningserviceowner")
            yield DpsRegisterMqtt(client, registration_id, rest)
    finally:
        await client.close()


class DpsRegisterHttps:
    """The DPS device API over HTTPS (PUT .../register): 400 (413 past 96 KB) with Azure's error body."""

    max_body = 96 * 1024

    def __init__(
        self, session: aiohttp.ClientSession, emulator: Any, registration_id: str, rest: Rest
    ) -> None:
        self.session, self.registration_id, self.rest = session, registration_id, rest
        base = f"https://{emulator.dps_host}:{emulator.https_port}"
        self.url = f"{base}/{emulator.id_scope}/registrations/{registration_id}/register"
        self.template = _in(f'{{"registrationId": "{registration_id}", "payload": %}}')

    async def refuses(self, shape: Hostile) -> None:
        body = shape.body(self.template)
        async with self.session.put(
            self.url, params={"api-version": "2021-06-01"}, data=body,
            headers={"Content-Type": "application/json"},
        ) as response:
            answer = await response.json()
            status = 413 if len(body) > self.max_body else 400
            assert response.status == status, answer
            assert answer["errorCode"] == status * 1000 + (1 if status == 413 else 4)
        assert (await self.rest.call("GET", f"/registrations/{self.registration_id}"))[0] == 404


@contextlib.asynccontextmanager
async def dps_register_https(emulator: Any, folder: Any) -> AsyncIterator[Target]:
    registration_id = f"hostile-{uuid.uuid4()}"
    cert = TestCa().issue(folder, registration_id)
    context = client_context(emulator.ca_pem, str(cert.cert_path), str(cert.key_path))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as device,
        rest_session(emulator) as service,
    ):
        rest = Rest(service, emulator.dps_connection_string, "provisioningserviceowner")
        yield DpsRegisterHttps(device, emulator, registration_id, rest)


# ---------------------------------------------------------------------------------- allocation webhook
class AllocationWebhook:
    """activation_svc's allocation webhook in group mode (``POST /api/allocate``, TLS, the function key),
    the body an AllocationRequest for an activated device with the hostile value as the device's
    ``payload`` (what a device sends DPS reaches the webhook): 400 (413 past 64 KiB) with one body, the
    refusal audited (ALLOCATION_REQUEST_MALFORMED, with ``jsonsafe``'s reason), the device's registry
    record and registration unchanged; a proper request still allocates the device."""

    def __init__(self, stack: Stack, device: Any) -> None:
        self.stack, self.device = stack, device
        proper = runtime_context(device.device_id, f"CN={device.device_id}", sha256_of(device), stack)
        self.proper = proper
        proper = {**proper, "deviceRuntimeContext": {**proper["deviceRuntimeContext"], "payload": "@"}}
        self.template = _in(json.dumps(proper).replace('"@"', "%"))

    async def refuses(self, shape: Hostile) -> None:
        registry = self.stack.activation_app.dps
        before = await registry.get(self.device.device_id)
        audited = self.stack.audit("")
        body = shape.body(self.template)
        status, answer = await self.stack.post(body)
        if len(body) > MAX_ALLOCATION_BODY:
            assert status == 413, answer
            assert self.stack.audit("")[len(audited) :] == [
                ("refused", f"ALLOCATION_REQUEST_MALFORMED: body over {MAX_ALLOCATION_BODY} bytes")
            ]
        else:
            assert (status, json.loads(answer)) == (400, {"message": "not an AllocationRequest"})
            [(outcome, detail)] = self.stack.audit("")[len(audited) :]
            assert outcome == "refused" and detail.startswith("ALLOCATION_REQUEST_MALFORMED: ")
            if shape.reason is not None:
                assert detail.startswith(f"ALLOCATION_REQUEST_MALFORMED: {shape.reason}: "), detail
        after = await registry.get(self.device.device_id)
        assert before is not None and after is not None
        assert (after.etag, after.registration_state) == (before.etag, before.registration_state)
        status, answer = await self.stack.post(self.proper)  # and it still allocates
        assert status == 200 and json.loads(answer)["iotHubHostName"] == self.stack.emulator.default_hub


@contextlib.asynccontextmanager
async def allocation_webhook(emulator: Any, folder: Any) -> AsyncIterator[Target]:
    tls = OemTls.create(folder / "oem-tls")
    stack = Stack(folder, emulator, tls)
    async with (
        running_activation(stack.activation_env(), tls) as (app, activation),
        running_factory(stack.factory_env()) as (_, factory),
    ):
        stack.factory, stack.activation, stack.activation_app = factory, activation, app
        device, code = await stack.enrolled()
        await activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
        yield AllocationWebhook(stack, device)


# ------------------------------------------------------------------------------------------ the matrix
TARGETS: dict[str, Callable[[Any, Any], Any]] = {
    "grpc-activate": grpc_activate,
    "portal-activate": portal_activate,
    "portal-batch-metadata": portal_batch,
    "hub-twin-patch": hub_rest("PATCH", "/twins/{id}", '{"tags": {"k": %}}'),
    "hub-twin-put": hub_rest("PUT", "/twins/{id}", '{"tags": {"k": %}}'),
    "hub-twin-patch-desired": hub_rest("PATCH", "/twins/{id}", '{"properties": {"desired": {"k": %}}}'),
    "hub-device-put": hub_rest("PUT", "/devices/NEW_ID", '{"deviceId": "NEW_ID", "k": %}'),
    "hub-query": hub_rest("POST", "/devices/query", '{"query": "SELECT * FROM devices", "k": %}'),
    "hub-method": hub_rest("POST", "/twins/{id}/methods", '{"methodName": "m", "payload": %}'),
    "dps-enrollment-put": dps_rest("PUT", "/enrollments/NEW_ID", "ENROLLMENT"),
    "dps-bulk": dps_rest("POST", "/enrollments", '{"mode": "create", "enrollments": [ENROLLMENT]}'),
    "dps-query": dps_rest("POST", "/enrollments/query", '{"query": "*", "k": %}'),
    "hub-mqtt-reported": on_hub_device(HubReportedMqtt),
    "hub-mqtt-method-response": on_hub_device(HubMethodResponseMqtt),
    "dps-mqtt-register": dps_register_mqtt,
    "dps-https-register": dps_register_https,
    "allocation-webhook": allocation_webhook,
}

TEXT_ONLY = frozenset(("grpc-activate",))  # a proto string is UTF-8 by construction: no non-UTF-8 shapes

CASES = [
    pytest.param(name, shape, id=f"{name}-{shape_id(shape)}")
    for name in TARGETS
    for shape in SHAPES
    if shape.utf8 or name not in TEXT_ONLY
]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def target(request, module_emulator, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    async with TARGETS[request.param](module_emulator, folder) as built:
        yield built


@pytest.mark.parametrize(("target", "shape"), CASES, indirect=["target"])
async def test_hostile_json_is_refused_and_changes_nothing(target: Target, shape: Hostile) -> None:
    await target.refuses(shape)
