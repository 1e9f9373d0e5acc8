"""``--azure-quotas`` against a real emulator process: DPS service operations past 1,000 per minute, a
device's polls past 5 per 10 s and registrations past 1,000 per minute are answered 429 with an integer
retry-after and Azure's error body, and change nothing; azure-iot-device's ProvisioningDeviceClient waits
the retry-after out and is assigned.  Without the flag nothing is limited (every other test)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid

import aiohttp
import pytest
from support.dps_device import sdk_register, x509_enrollment
from support.emulator import EmulatorProcess
from support.mqtt_client import MqttTestClient, client_context

from azure_iot_emulator.sas import generate_sas


@pytest.fixture(scope="module")
def quota_emulator(tmp_path_factory):
    emu = EmulatorProcess(
        tmp_path_factory.mktemp("quotas") / "data",
        hubs=1,
        extra_args=["--azure-quotas", "--assignment-delay", "60", "--log-level", "WARNING"],
    )
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def dps_host_port(emu) -> str:
    return emu.dps_connection_string.split("HostName=", 1)[1].split(";", 1)[0]


def dps_token(emu) -> str:
    key = emu.dps_connection_string.split("SharedAccessKey=", 1)[1]
    expiry = int(time.time()) + 900
    return generate_sas(dps_host_port(emu), key, policy="provisioningserviceowner", expiry=expiry)


class Dps:
    """Raw REST calls with one SAS token (no SDK retries: the test sees every 429)."""

    def __init__(self, http: aiohttp.ClientSession, emu) -> None:
        self.http, self.emu = http, emu
        self.headers = {"Authorization": dps_token(emu)}
        self.ctx = ssl.create_default_context(cafile=str(emu.ca_path))

    async def call(self, method: str, reg_id: str, body: dict | None = None) -> tuple[int, dict, dict]:
        url = f"https://{dps_host_port(self.emu)}/enrollments/{reg_id}?api-version=2021-10-01"
        async with self.http.request(method, url, json=body, headers=self.headers, ssl=self.ctx) as response:
            return response.status, dict(response.headers), json.loads(await response.read())

    async def exhaust(self) -> tuple[dict, dict]:
        """GETs until the operations quota answers 429; (headers, body) of that answer."""
        for _ in range(5000):
            status, headers, body = await self.call("GET", "nobody")
            if status == 429:
                return headers, body
            assert status == 404
        raise AssertionError("no 429 after 5,000 operations")


@pytest.mark.slow
async def test_service_operations_past_the_quota_are_429_with_retry_after_and_write_nothing(
    quota_emulator, ca, tmp_path
):
    reg_id = f"q-{uuid.uuid4().hex[:8]}"
    enrollment = x509_enrollment(reg_id, ca.issue(tmp_path, reg_id).pem)
    async with aiohttp.ClientSession() as http:
        dps = Dps(http, quota_emulator)
        for _ in range(10):
            headers, body = await dps.exhaust()
            assert int(headers["Retry-After"]) >= 1
            assert body["errorCode"] == 429001 and body["trackingId"]
            status, headers, _ = await dps.call("PUT", reg_id, enrollment)
            if status == 429:
                break
            assert status == 200  # the quota refilled a token in between: try again with another id
            reg_id = f"q-{uuid.uuid4().hex[:8]}"
            enrollment = x509_enrollment(reg_id, ca.issue(tmp_path, reg_id).pem)
        assert status == 429 and int(headers["Retry-After"]) >= 1
        await asyncio.sleep(int(headers["Retry-After"]))
        assert (await dps.call("GET", reg_id))[0] == 404  # the refused write left nothing
        assert (await dps.call("PUT", reg_id, enrollment))[0] == 200


async def test_device_polls_past_5_per_10_seconds_are_429_with_retry_after(quota_emulator, ca, tmp_path):
    emu = quota_emulator
    reg_id = f"poll-{uuid.uuid4().hex[:8]}"
    cert = ca.issue(tmp_path, reg_id)
    async with aiohttp.ClientSession() as http:
        dps = Dps(http, emu)
        for _ in range(20):  # the other test may have left the operations quota empty: wait it out
            status, headers, _ = await dps.call("PUT", reg_id, x509_enrollment(reg_id, cert.pem))
            if status != 429:
                assert status == 200
                break
            await asyncio.sleep(int(headers["Retry-After"]))
    client, _ = await MqttTestClient.connect(
        emu.dps_host,
        client_context(emu.ca_pem, str(cert.cert_path), str(cert.key_path)),
        client_id=reg_id,
        username=f"{emu.id_scope}/registrations/{reg_id}/api-version=2019-03-31",
    )
    try:
        await client.subscribe("$dps/registrations/res/#")
        await client.publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=reg",
            json.dumps({"registrationId": reg_id, "payload": None}).encode(),
        )
        accepted = await client.next_publish()
        assert accepted.topic.startswith("$dps/registrations/res/202/?$rid=reg&retry-after=")
        op = json.loads(accepted.payload)["operationId"]
        answers = []
        for n in range(6):
            await client.publish(
                f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid=p{n}&operationId={op}", b" "
            )
            answers.append(await client.next_publish())
        for n, answer in enumerate(answers[:5]):
            assert answer.topic.startswith(f"$dps/registrations/res/202/?$rid=p{n}&")
        assert answers[5].topic == "$dps/registrations/res/429/?$rid=p5&retry-after=2"
        assert json.loads(answers[5].payload)["errorCode"] == 429001
    finally:
        await client.close()


@pytest.mark.slow
async def test_device_sdk_waits_out_a_429_on_register_and_is_assigned(tmp_path, ca):
    """Another client floods register requests (for an id without enrollment: each costs a quota token
    and is answered 404), so the SDK's own register meets the 1,000 per minute quota; once the emulator
    has answered it 429, the flood stops and the SDK, having waited the retry-after, is assigned."""
    emu = EmulatorProcess(tmp_path / "emu", hubs=1, extra_args=["--azure-quotas"])
    emu.start()
    try:
        flooder = ca.issue(tmp_path / "flood", "flooder")
        client, _ = await MqttTestClient.connect(
            emu.dps_host,
            client_context(emu.ca_pem, str(flooder.cert_path), str(flooder.key_path)),
            client_id="flooder",
            username=f"{emu.id_scope}/registrations/flooder/api-version=2019-03-31",
        )
        await client.subscribe("$dps/registrations/res/#")
        body = json.dumps({"registrationId": "flooder", "payload": None}).encode()
        stop = asyncio.Event()

        async def flood() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                await client.publish(f"$dps/registrations/PUT/iotdps-register/?$rid=f{n}", body)
                while not client.publishes.empty():
                    client.publishes.get_nowait()

        flooding = asyncio.create_task(flood())
        try:
            for attempt in range(5):  # the SDK may, rarely, catch a refilled token before the flood does
                reg_id = f"patient-{attempt}-{uuid.uuid4().hex[:6]}"
                cert = ca.issue(tmp_path / reg_id, reg_id)
                async with aiohttp.ClientSession() as http:
                    dps = Dps(http, emu)
                    while (await dps.call("PUT", reg_id, x509_enrollment(reg_id, cert.pem)))[0] == 429:
                        await asyncio.sleep(1)
                stop.clear()
                if flooding.done():
                    flooding = asyncio.create_task(flood())
                registering = asyncio.create_task(sdk_register(emu, reg_id, cert))
                while f"DPS register {reg_id}: 429" not in emu.log_text() and not registering.done():
                    await asyncio.sleep(0.1)
                stop.set()
                result = await registering
                assert result.status == "assigned"
                if f"DPS register {reg_id}: 429" in emu.log_text():
                    break
            else:
                raise AssertionError("the SDK never met the quota in five tries")
        finally:
            stop.set()
            await flooding
            await client.close()
    finally:
        emu.stop()
