"""Allocation policies with Microsoft's clients unchanged: enrollments written with
azure-iot-deviceprovisioning, devices registering with azure-iot-device (X.509), hubs read with azure-iot-hub,
and for ``custom`` a webhook on loopback (aiohttp, http and https) that records each AllocationRequest and
answers as the test tells it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import ssl
import uuid
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.iot.device.aio import ProvisioningDeviceClient
from azure.iot.device.exceptions import ClientError
from conftest import running_emulator
from support.certs import TestCa
from support.dps_device import register_once, sdk_register, x509_enrollment

from azure_iot_emulator.dps.allocation import hashed_choice

pytestmark = pytest.mark.slow

WEBHOOK_TIMEOUT = 2  # the emulator's --allocation-webhook-timeout here


@pytest.fixture(scope="module")
def webhook_ca():
    return TestCa("webhook test CA")


@pytest.fixture(scope="module")
def module_emulator(tmp_path_factory, webhook_ca):
    """This module's emulator: immediate answers, a short webhook timeout, the webhook CA trusted."""
    ca_file = tmp_path_factory.mktemp("webhook-ca") / "ca.pem"
    ca_file.write_bytes(webhook_ca.pem)
    args = [
        "--assignment-delay", "immediate",
        "--allocation-webhook-timeout", str(WEBHOOK_TIMEOUT),
        "--allocation-webhook-ca", str(ca_file),
    ]
    with running_emulator(tmp_path_factory.mktemp("emulator") / "data", args) as emu:
        yield emu


Answer = Callable[[dict], Awaitable[web.StreamResponse]]


class Webhook:
    """A custom allocation webhook: records every request body, answers with ``answer``."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.answer: Answer = self._no_answer
        self.released = asyncio.Event()
        self.url = ""

    async def _no_answer(self, request: dict) -> web.StreamResponse:
        raise AssertionError("the test set no answer")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert request.method == "POST" and request.content_type == "application/json"
        body = await request.json()
        self.requests.append(body)
        return await self.answer(body)

    async def hang(self, _: dict) -> web.StreamResponse:
        """Answers only when the test ends: longer than the emulator waits."""
        await self.released.wait()
        return web.json_response({})

    def reply(self, body: dict) -> None:
        async def answer(_: dict) -> web.StreamResponse:
            return web.json_response(body)

        self.answer = answer


async def _serve(webhook: Webhook, ssl_context: ssl.SSLContext | None):
    app = web.Application()
    app.router.add_post("/api/allocate", webhook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scheme = "https" if ssl_context else "http"
    webhook.url = f"{scheme}://127.0.0.1:{port}/api/allocate?code=function-key"
    return runner


@pytest.fixture
async def webhook():
    hook = Webhook()
    runner = await _serve(hook, None)
    yield hook
    hook.released.set()
    await runner.cleanup()


@pytest.fixture
async def tls_webhook(webhook_ca, tmp_path):
    pki = webhook_ca.server(tmp_path / "webhook-tls", ["127.0.0.1"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert_path, pki.key_path)
    hook = Webhook()
    runner = await _serve(hook, context)
    yield hook
    hook.released.set()
    await runner.cleanup()


def new_id() -> str:
    return f"alloc-{uuid.uuid4().hex[:12]}"


def custom(webhook: Webhook, **extra) -> dict:
    return {
        "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": webhook.url, "apiVersion": "2021-10-01"},
        **extra,
    }


async def register(emu, reg_id: str, cert, payload=None):
    return await sdk_register(emu, reg_id, cert, 45, payload)


async def devices_on(hubs: dict, device_id: str) -> list[str]:
    found = []
    for host, registry in hubs.items():
        try:
            await asyncio.to_thread(registry.get_device, device_id)
        except Exception as exc:  # msrest HttpOperationError
            assert getattr(getattr(exc, "response", None), "status_code", None) == 404, exc
        else:
            found.append(host)
    return found


async def test_custom_webhook_chooses_the_hub_sets_the_twin_and_round_trips_the_payload(
    module_emulator, dps, hubs, ca, tmp_path, webhook
):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id)
    first, second = module_emulator.hub_hosts
    await dps.enrollment.create_or_update(
        id=reg_id,
        enrollment=x509_enrollment(
            reg_id, cert.pem, initialTwin={"tags": {"from": "enrollment"}}, **custom(webhook)
        ),
    )
    webhook.reply(
        {
            "iotHubHostName": second.upper(),  # host names compare case-insensitively
            "initialTwin": {"tags": {"line": "B"}, "properties": {"desired": {"fw": "2.1"}}},
            "payload": {"welcome": reg_id, "slots": [1, 2]},
        }
    )
    result = await register(module_emulator, reg_id, cert, payload={"model": "toaster", "rev": 7})
    assert result.status == "assigned"
    assert (result.registration_state.assigned_hub, result.registration_state.device_id) == (second, reg_id)
    assert json.loads(result.registration_state.response_payload) == {"welcome": reg_id, "slots": [1, 2]}

    twin = await asyncio.to_thread(hubs[second].get_twin, reg_id)
    assert twin.tags == {"line": "B"} and twin.properties.desired["fw"] == "2.1"
    assert await devices_on(hubs, reg_id) == [second]
    state = await dps.device_registration_state.get(id=reg_id)
    assert state["assignedHub"] == second and state["payload"] == {"welcome": reg_id, "slots": [1, 2]}

    (sent,) = webhook.requests
    assert set(sent) == {"individualEnrollment", "deviceRuntimeContext", "linkedHubs"}
    entry = sent["individualEnrollment"]
    assert entry["registrationId"] == reg_id and entry["allocationPolicy"] == "custom"
    assert entry["customAllocationDefinition"] == {"webhookUrl": webhook.url, "apiVersion": "2021-10-01"}
    assert entry["attestation"]["type"] == "x509" and cert.pem.strip() not in json.dumps(entry)
    primary = entry["attestation"]["x509"]["clientCertificates"]["primary"]
    assert primary == {"info": primary["info"]} and primary["info"]["sha1Thumbprint"] == cert.sha1
    assert "registrationState" not in entry and entry["etag"]
    context = sent["deviceRuntimeContext"]
    assert context == {
        "registrationId": reg_id,
        "x509": {"certificateInfo": context["x509"]["certificateInfo"]},
        "payload": {"model": "toaster", "rev": 7},
    }
    assert context["x509"]["certificateInfo"]["sha256Thumbprint"] == cert.sha256
    assert sent["linkedHubs"] == [first, second]

    # Registering again: the webhook learns the current assignment and moves the device.
    webhook.reply({"iotHubHostName": first})
    again = await register(module_emulator, reg_id, cert)
    assert again.registration_state.assigned_hub == first
    assert again.registration_state.sub_status == "deviceDataMigrated"
    assert json.loads(again.registration_state.response_payload) is None
    context = webhook.requests[1]["deviceRuntimeContext"]
    assert (context["currentIotHubHostName"], context["currentDeviceId"]) == (second, reg_id)
    assert "payload" not in context
    assert await devices_on(hubs, reg_id) == [first]


async def test_custom_webhook_over_https_trusting_the_configured_ca(
    module_emulator, dps, hubs, ca, tmp_path, tls_webhook
):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id)
    hub = module_emulator.hub_hosts[0]
    await dps.enrollment.create_or_update(
        id=reg_id,
        enrollment=x509_enrollment(
            reg_id, cert.pem, initialTwin={"tags": {"from": "enrollment"}}, **custom(tls_webhook)
        ),
    )
    tls_webhook.reply({"iotHubHostName": hub})  # no initialTwin: the enrollment's applies
    result = await register(module_emulator, reg_id, cert)
    assert result.registration_state.assigned_hub == hub
    assert (await asyncio.to_thread(hubs[hub].get_twin, reg_id)).tags == {"from": "enrollment"}
    assert len(tls_webhook.requests) == 1


def _status(code: int) -> Answer:
    async def answer(_: dict) -> web.StreamResponse:
        return web.Response(status=code, text="webhook refused")

    return answer


def _text(text: str) -> Answer:
    async def answer(_: dict) -> web.StreamResponse:
        return web.Response(status=200, text=text, content_type="application/json")

    return answer


def _json(body: object) -> Answer:
    async def answer(_: dict) -> web.StreamResponse:
        return web.json_response(body)

    return answer


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda hook, hub: _status(500), id="500"),
        pytest.param(lambda hook, hub: _status(401), id="401"),
        pytest.param(lambda hook, hub: _text('{"iotHubHostName": '), id="bad-json"),
        pytest.param(
            lambda hook, hub: _text('{"iotHubHostName": "a", "iotHubHostName": "b"}'), id="duplicate-key"
        ),
        pytest.param(lambda hook, hub: _json(["not", "an", "object"]), id="not-an-object"),
        pytest.param(lambda hook, hub: _json({"iotHubHostName": "127.9.9.9"}), id="unknown-hub"),
        pytest.param(lambda hook, hub: _json({"iotHubHostName": None}), id="no-hub"),
        pytest.param(
            lambda hook, hub: _json({"iotHubHostName": hub, "initialTwin": {"tags": {"bad key$": 1}}}),
            id="bad-initial-twin",
        ),
        pytest.param(lambda hook, hub: hook.hang, id="timeout"),
    ],
)
async def test_custom_webhook_failures_fail_the_registration_and_create_nothing(
    module_emulator, dps, hubs, ca, tmp_path, webhook, answer
):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id)
    hub = module_emulator.hub_hosts[0]
    body = x509_enrollment(reg_id, cert.pem, **custom(webhook))
    await dps.enrollment.create_or_update(id=reg_id, enrollment=body)
    webhook.answer = answer(webhook, hub)
    with pytest.raises(ClientError):
        await register(module_emulator, reg_id, cert)
    assert len(webhook.requests) == 1
    assert await devices_on(hubs, reg_id) == []
    with pytest.raises(ResourceNotFoundError):
        await dps.device_registration_state.get(id=reg_id)


async def test_builtin_policies_static_lowest_latency_and_hashed(module_emulator, dps, ca, tmp_path):
    first, second = module_emulator.hub_hosts
    cases = {
        "static": ({"allocationPolicy": "static", "iotHubs": [second]}, second),
        # Lowest latency: the enrollment hub first in the emulator's configured order.
        "geoLatency": ({"allocationPolicy": "geoLatency", "iotHubs": [second, first]}, first),
    }
    for policy, (extra, expected) in cases.items():
        reg_id = new_id()
        cert = ca.issue(tmp_path / policy, reg_id)
        body = x509_enrollment(reg_id, cert.pem, **extra)
        await dps.enrollment.create_or_update(id=reg_id, enrollment=body)
        result = await register(module_emulator, reg_id, cert)
        assert result.registration_state.assigned_hub == expected, policy
    reg_id = new_id()
    cert = ca.issue(tmp_path / "hashed", reg_id)
    await dps.enrollment.create_or_update(
        id=reg_id, enrollment=x509_enrollment(reg_id, cert.pem, allocationPolicy="hashed")
    )
    result = await register(module_emulator, reg_id, cert)
    assert result.registration_state.assigned_hub == hashed_choice(reg_id, [first, second])


@pytest.mark.parametrize(
    "definition",
    [
        None,
        {"webhookUrl": "ftp://127.0.0.1/x", "apiVersion": "2021-10-01"},
        {"webhookUrl": "/relative", "apiVersion": "2021-10-01"},
        {"webhookUrl": "http://user:pw@127.0.0.1/x", "apiVersion": "2021-10-01"},
        {"webhookUrl": "http://127.0.0.1/x"},
        {"webhookUrl": "http://127.0.0.1/x", "apiVersion": "latest"},
    ],
)
async def test_custom_policy_needs_a_valid_definition(module_emulator, dps, ca, tmp_path, definition):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id)
    body = x509_enrollment(reg_id, cert.pem, allocationPolicy="custom")
    if definition is not None:
        body["customAllocationDefinition"] = definition
    with pytest.raises(HttpResponseError) as refused:
        await dps.enrollment.create_or_update(id=reg_id, enrollment=body)
    assert refused.value.status_code == 400
    with pytest.raises(ResourceNotFoundError):
        await dps.enrollment.get(id=reg_id)


async def test_custom_webhook_for_a_symmetric_key_group_is_asked_with_the_group(
    module_emulator, dps, hubs, webhook
):
    """A device of an enrollment group (here a symmetric-key one, its key derived from the group's) is
    allocated by the group's webhook, whose AllocationRequest carries the group, not an enrollment."""
    group_id, reg_id = f"grp-{uuid.uuid4().hex[:12]}", new_id()
    primary, secondary = (base64.b64encode(secrets.token_bytes(32)).decode() for _ in range(2))
    group = {
        "enrollmentGroupId": group_id,
        "attestation": {
            "type": "symmetricKey",
            "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary},
        },
        **custom(webhook),
    }
    await dps.enrollment_group.create_or_update(id=group_id, enrollment_group=group)
    first, second = module_emulator.hub_hosts
    webhook.reply({"iotHubHostName": second, "payload": {"line": 3}})
    device_key = base64.b64encode(
        hmac.new(base64.b64decode(primary), reg_id.encode(), hashlib.sha256).digest()
    ).decode()
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=module_emulator.dps_host,
        registration_id=reg_id,
        id_scope=module_emulator.id_scope,
        symmetric_key=device_key,
        server_verification_cert=module_emulator.ca_pem,
    )
    client.provisioning_payload = {"model": "m1"}
    result = await register_once(client, 45)
    assert (result.status, result.registration_state.assigned_hub) == ("assigned", second)
    assert json.loads(result.registration_state.response_payload) == {"line": 3}
    assert await devices_on(hubs, reg_id) == [second]
    (sent,) = webhook.requests
    assert set(sent) == {"enrollmentGroup", "deviceRuntimeContext", "linkedHubs"}
    assert sent["enrollmentGroup"]["enrollmentGroupId"] == group_id
    assert primary not in json.dumps(sent) and secondary not in json.dumps(sent)  # no key leaves DPS
    context = sent["deviceRuntimeContext"]
    assert context["registrationId"] == reg_id and context["payload"] == {"model": "m1"}
    assert sent["linkedHubs"] == [first, second]
