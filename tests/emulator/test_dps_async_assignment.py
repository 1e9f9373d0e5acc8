"""Azure's asynchronous registration: the register request is answered ``202 assigning`` with an
operation id and ``retry-after`` and the device polls until it is assigned -- with azure-iot-device's
ProvisioningDeviceClient (MQTT) unchanged, and over the DPS device HTTPS API that other SDKs and firmware
use.  Also the ``immediate`` mode."""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid

import aiohttp
import pytest
from azure.core.exceptions import ResourceNotFoundError
from support.dps_device import sdk_register, x509_enrollment
from support.emulator import EmulatorProcess

API = "api-version=2021-06-01"
DELAY = 4  # seconds: longer than the SDK's fixed 2 s wait, so its first poll is answered 202


@pytest.fixture(scope="module")
def slow_emulator(tmp_path_factory):
    emu = EmulatorProcess(
        tmp_path_factory.mktemp("slow") / "data", hubs=1, extra_args=["--assignment-delay", str(DELAY)]
    )
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def new_id() -> str:
    return f"async-{uuid.uuid4().hex[:10]}"


async def enroll(emu, ca, tmp_path, reg_id: str):
    from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient

    cert = ca.issue(tmp_path, reg_id)
    client = DeviceProvisioningClient.from_connection_string(
        emu.dps_connection_string, connection_verify=str(emu.ca_path)
    )
    async with client:
        await client.enrollment.create_or_update(id=reg_id, enrollment=x509_enrollment(reg_id, cert.pem))
    return cert


async def registration_state(emu, reg_id: str) -> dict | None:
    from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient

    client = DeviceProvisioningClient.from_connection_string(
        emu.dps_connection_string, connection_verify=str(emu.ca_path)
    )
    async with client:
        try:
            return await client.device_registration_state.get(id=reg_id)
        except ResourceNotFoundError:
            return None


@pytest.mark.slow
async def test_sdk_polls_through_202_until_assigned(slow_emulator, ca, tmp_path):
    reg_id = new_id()
    cert = await enroll(slow_emulator, ca, tmp_path, reg_id)
    result = await sdk_register(slow_emulator, reg_id, cert)
    assert result.status == "assigned"
    assert result.registration_state.assigned_hub == slow_emulator.hub_hosts[0]
    assert result.registration_state.device_id == reg_id
    # The SDK's first poll came 2 s after the register request: it was answered 202, then it polled again.
    log = slow_emulator.log_text()
    assert f"DPS register {reg_id}: 202 assigning" in log
    assert f"DPS poll {reg_id}: 202 assigning" in log
    assert f"DPS poll {reg_id}: 200 assigned" in log


@pytest.mark.slow
async def test_immediate_mode_answers_the_register_request_with_the_result(tmp_path, ca):
    emu = EmulatorProcess(tmp_path / "emu", hubs=1, extra_args=["--assignment-delay", "immediate"])
    emu.start()
    try:
        reg_id = new_id()
        cert = await enroll(emu, ca, tmp_path, reg_id)
        result = await sdk_register(emu, reg_id, cert)
        assert result.status == "assigned"
        assert f"DPS register {reg_id}: 200 assigned" in emu.log_text()
        assert f"DPS poll {reg_id}" not in emu.log_text()
    finally:
        emu.stop()


# ------------------------------------------------------------------------------ the device HTTPS API
def tls(emu, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=emu.ca_pem)
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert_path), str(cert.key_path))
    return ctx


def base_url(emu) -> str:
    return f"https://{emu.dps_host}:{emu.https_port}/{emu.id_scope}/registrations"


@pytest.mark.slow
async def test_device_https_api_register_then_poll_until_assigned(slow_emulator, ca, tmp_path):
    emu = slow_emulator
    reg_id = new_id()
    cert = await enroll(emu, ca, tmp_path, reg_id)
    async with aiohttp.ClientSession() as http:
        url = f"{base_url(emu)}/{reg_id}/register?{API}"
        async with http.put(url, json={"registrationId": reg_id}, ssl=tls(emu, cert)) as response:
            assert response.status == 202
            assert int(response.headers["Retry-After"]) >= 1
            accepted = await response.json()
        assert accepted["status"] == "assigning" and accepted["operationId"]
        op_url = f"{base_url(emu)}/{reg_id}/operations/{accepted['operationId']}?{API}"
        seen = []
        while True:
            async with http.get(op_url, ssl=tls(emu, cert)) as response:
                seen.append(response.status)
                body = await response.json()
                if response.status == 202:
                    assert int(response.headers["Retry-After"]) >= 1
                    assert body == {"operationId": accepted["operationId"], "status": "assigning"}
                    await asyncio.sleep(0.5)
                    continue
            break
        assert seen[-1] == 200 and set(seen[:-1]) <= {202}
        assert body["status"] == "assigned"
        assert body["registrationState"]["assignedHub"] == emu.hub_hosts[0]
        assert body["registrationState"]["deviceId"] == reg_id

        # Another device cannot read this operation (as unknown as a made-up one).
        other_id = new_id()
        other = await enroll(emu, ca, tmp_path, other_id)
        stolen = f"{base_url(emu)}/{other_id}/operations/{accepted['operationId']}?{API}"
        async with http.get(stolen, ssl=tls(emu, other)) as response:
            assert response.status == 404
            assert (await response.json())["errorCode"] == 404203
    state = await registration_state(emu, reg_id)
    assert state is not None and state["status"] == "assigned"


@pytest.mark.parametrize(
    "case", ["no client certificate", "wrong certificate", "other ID scope", "body for another id",
             "no api-version", "not json"],
)
async def test_device_https_api_refusals_write_nothing(slow_emulator, ca, tmp_path, case):
    emu = slow_emulator
    reg_id = new_id()
    cert = await enroll(emu, ca, tmp_path, reg_id)
    stranger = ca.issue(tmp_path / "stranger", reg_id)  # right CN, not the enrolled certificate
    url = f"{base_url(emu)}/{reg_id}/register?{API}"
    body: bytes = json.dumps({"registrationId": reg_id}).encode()
    ctx = tls(emu, cert)
    expected = (400, 400004)
    if case == "no client certificate":
        ctx, expected = tls(emu), (401, 401002)
    elif case == "wrong certificate":
        ctx, expected = tls(emu, stranger), (401, 401002)
    elif case == "other ID scope":
        url, expected = url.replace(emu.id_scope, "0ne00000000"), (401, 401002)
    elif case == "body for another id":
        body = json.dumps({"registrationId": "someone-else"}).encode()
    elif case == "no api-version":
        url = url.split("?")[0]
    else:
        body = b"{not json"
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as http,
        http.put(url, data=body, ssl=ctx, headers=headers) as response,
    ):
        assert response.status == expected[0]
        error = await response.json()
        assert error["errorCode"] == expected[1] and error["trackingId"]
        assert "Retry-After" not in response.headers
    assert await registration_state(emu, reg_id) is None
