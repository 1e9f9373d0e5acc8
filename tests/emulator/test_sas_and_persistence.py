"""REST SAS as Azure checks it (missing, expired, wrong key, wrong policy -> 401 and nothing done), and a
restart that keeps enrollments, registrations, hub identities, keys, ID scope and CA."""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid

import aiohttp
import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ClientAuthenticationError
from azure.iot.device import X509
from azure.iot.device.aio import ProvisioningDeviceClient
from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient
from azure.iot.hub import IoTHubRegistryManager
from support.certs import TestCa

from azure_iot_emulator.sas import generate_sas


def _key(emu) -> str:
    return emu.dps_connection_string.split("SharedAccessKey=", 1)[1]


def _host(emu) -> str:
    return emu.dps_connection_string.split("HostName=", 1)[1].split(";", 1)[0]


def _enrollment(reg_id: str, pem: str) -> dict:
    return {
        "registrationId": reg_id,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}},
    }


async def _put(emu, reg_id: str, authorization: str | None, body: dict) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=str(emu.ca_path))
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"https://{_host(emu)}/enrollments/{reg_id}?api-version=2021-10-01",
            json=body,
            headers=headers,
            ssl=ctx,
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


@pytest.mark.parametrize(
    "token",
    [
        lambda emu: None,
        lambda emu: "",
        lambda emu: "Bearer abc",
        lambda emu: generate_sas(
            _host(emu), _key(emu), policy="provisioningserviceowner", expiry=int(time.time()) - 5
        ),
        lambda emu: generate_sas(
            _host(emu),
            "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=",
            policy="provisioningserviceowner",
            expiry=int(time.time()) + 600,
        ),
        lambda emu: generate_sas(
            _host(emu), _key(emu), policy="registryowner", expiry=int(time.time()) + 600
        ),
        lambda emu: generate_sas(
            _host(emu), _key(emu), policy="provisioningserviceowner", expiry=int(time.time()) + 600
        ).replace("sig=", "sig=A"),
        # Signed with the right key, but for another audience: another host, another port of this host,
        # or a resource of this DPS that does not cover /enrollments.
        lambda emu: generate_sas(
            "evil.example.com", _key(emu), policy="provisioningserviceowner", expiry=int(time.time()) + 600
        ),
        lambda emu: generate_sas(
            _host(emu).rsplit(":", 1)[0] + ":1", _key(emu), policy="provisioningserviceowner",
            expiry=int(time.time()) + 600,
        ),
        lambda emu: generate_sas(
            _host(emu) + "/registrations", _key(emu), policy="provisioningserviceowner",
            expiry=int(time.time()) + 600,
        ),
        lambda emu: generate_sas(
            _host(emu) + "/enrollmentsx", _key(emu), policy="provisioningserviceowner",
            expiry=int(time.time()) + 600,
        ),
        # An expiry that is digits to str.isdigit but not to int(), and one int() refuses for its length.
        lambda emu: f"SharedAccessSignature sr={_host(emu)}&sig=x&se=\u00b2&skn=provisioningserviceowner",
        lambda emu: (
            f"SharedAccessSignature sr={_host(emu)}&sig=x&se={'9' * 5000}&skn=provisioningserviceowner"
        ),
    ],
    ids=[
        "missing", "empty", "not-sas", "expired", "wrong-key", "wrong-policy", "tampered",
        "other-audience", "other-port", "other-resource", "not-a-segment-prefix",
        "superscript-expiry", "huge-expiry",
    ],
)
async def test_bad_sas_is_401_and_writes_nothing(module_emulator, token, tmp_path):
    reg_id = f"sas-{uuid.uuid4().hex[:8]}"
    cert = TestCa().issue(tmp_path, reg_id)
    status, body = await _put(module_emulator, reg_id, token(module_emulator), _enrollment(reg_id, cert.pem))
    assert status == 401
    assert body["errorCode"] == 401002 and body["trackingId"] and body["timestampUtc"]
    good = generate_sas(
        _host(module_emulator),
        _key(module_emulator),
        policy="provisioningserviceowner",
        expiry=int(time.time()) + 600,
    )
    ok_status, created = await _put(module_emulator, reg_id, good, _enrollment(reg_id, cert.pem))
    assert ok_status == 200 and created["registrationId"] == reg_id  # it did not exist before: no 409


async def test_a_token_scoped_to_enrollments_is_enough_for_enrollments(module_emulator, tmp_path):
    host = _host(module_emulator)
    for resource in (f"{host}/enrollments", f"https://{host}/", f"{host}/Enrollments/"):
        reg_id = f"scoped-{uuid.uuid4().hex[:8]}"
        cert = TestCa().issue(tmp_path, reg_id)
        scoped = generate_sas(
            resource, _key(module_emulator), policy="provisioningserviceowner", expiry=int(time.time()) + 600
        )
        status, created = await _put(module_emulator, reg_id, scoped, _enrollment(reg_id, cert.pem))
        assert status == 200 and created["registrationId"] == reg_id, resource


async def test_sdk_with_wrong_key_gets_client_authentication_error(module_emulator):
    wrong = module_emulator.dps_connection_string.replace(
        _key(module_emulator), "d3Jvbmcta2V5LXdyb25nLWtleQ=="
    )
    async with DeviceProvisioningClient.from_connection_string(
        wrong, connection_verify=str(module_emulator.ca_path)
    ) as client:
        with pytest.raises(ClientAuthenticationError):
            await client.enrollment.get(id="anything")


async def test_sdk_endpoint_with_scheme_signs_another_audience_and_is_accepted(module_emulator):
    credential = AzureNamedKeyCredential("provisioningserviceowner", _key(module_emulator))
    async with DeviceProvisioningClient(
        endpoint=f"https://{_host(module_emulator)}/",
        credential=credential,
        connection_verify=str(module_emulator.ca_path),
    ) as client:
        with pytest.raises(Exception) as info:
            await client.enrollment.get(id=f"none-{uuid.uuid4().hex[:6]}")
        assert getattr(info.value, "status_code", None) == 404


@pytest.mark.slow
async def test_restart_keeps_everything(emulator, tmp_path, monkeypatch):
    ca = TestCa()
    reg_id = f"keep-{uuid.uuid4().hex[:8]}"
    cert = ca.issue(tmp_path, reg_id)
    before = dict(emulator.connection)
    ca_pem = emulator.ca_pem

    async def dps_client():
        return DeviceProvisioningClient.from_connection_string(
            emulator.dps_connection_string, connection_verify=str(emulator.ca_path)
        )

    async with await dps_client() as dps:
        enrolled = await dps.enrollment.create_or_update(id=reg_id, enrollment=_enrollment(reg_id, cert.pem))

    def pdc():
        return ProvisioningDeviceClient.create_from_x509_certificate(
            provisioning_host=emulator.dps_host,
            registration_id=reg_id,
            id_scope=emulator.id_scope,
            x509=X509(str(cert.cert_path), str(cert.key_path)),
            server_verification_cert=emulator.ca_pem,
        )

    first = await asyncio.wait_for(pdc().register(), 45)
    assert first.status == "assigned"

    await asyncio.to_thread(emulator.restart)

    assert emulator.id_scope == before["id_scope"]
    assert emulator.dps_connection_string == before["dps"]["connection_string"]
    assert emulator.hub_connection_strings == [h["connection_string"] for h in before["hubs"]]
    assert emulator.ca_pem == ca_pem
    async with await dps_client() as dps:
        assert (await dps.enrollment.get(id=reg_id))["etag"] == enrolled["etag"]
        state = await dps.device_registration_state.get(id=reg_id)
        assert state["assignedHub"] == first.registration_state.assigned_hub
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))
    registry = IoTHubRegistryManager.from_connection_string(
        emulator.hub_connection_string(first.registration_state.assigned_hub)
    )
    device = await asyncio.to_thread(registry.get_device, reg_id)
    assert device.authentication.x509_thumbprint.primary_thumbprint == cert.sha1
    again = await asyncio.wait_for(pdc().register(), 45)
    assert again.registration_state.assigned_hub == first.registration_state.assigned_hub
    assert emulator.stop() == 0  # graceful SIGTERM exit code


async def test_unknown_paths_and_methods_get_azure_error_bodies(module_emulator):
    token = generate_sas(
        _host(module_emulator),
        _key(module_emulator),
        policy="provisioningserviceowner",
        expiry=int(time.time()) + 600,
    )
    ctx = ssl.create_default_context(cafile=str(module_emulator.ca_path))
    base = f"https://{_host(module_emulator)}"
    async with aiohttp.ClientSession(headers={"Authorization": token}) as session:
        for method, path, status in (
            ("GET", "/nothing-here", 404),
            ("PATCH", "/enrollments/x", 405),
            ("GET", "/enrollmentGroups/g1", 404),
        ):
            async with session.request(method, base + path + "?api-version=2021-10-01", ssl=ctx) as response:
                body = await response.json()
                assert response.status == status and body["errorCode"] // 1000 == status, (path, body)
