"""Enrollment groups, symmetric-key attestation and registration states against a real emulator process,
with Microsoft's clients unchanged: azure-iot-deviceprovisioning (groups CRUD with etags, bulk, query;
registration states get/delete/query) and azure-iot-device (ProvisioningDeviceClient with a certificate
chain under an X.509 group and with a derived key under a symmetric-key group, then IoTHubDeviceClient
sending telemetry to the assigned hub)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import ssl
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.iot.device import X509, Message
from azure.iot.device.aio import IoTHubDeviceClient, ProvisioningDeviceClient
from azure.iot.device.exceptions import ClientError
from azure.iot.hub import IoTHubRegistryManager
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.certs import TestCa
from support.dps_device import SERVICE_REGISTRATION_STATE, register_once
from support.dps_device import x509_enrollment as individual_x509

from azure_iot_emulator.sas import generate_sas

TIMEOUT = 45


def new_id(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def derived_key(group_key: str, registration_id: str) -> str:
    """Azure's derivation, written out here independently of the emulator's."""
    mac = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def x509_group(group_id: str, signing_pem: str, **extra) -> dict:
    return {
        "enrollmentGroupId": group_id,
        "attestation": {
            "type": "x509",
            "x509": {"signingCertificates": {"primary": {"certificate": signing_pem}}},
        },
        **extra,
    }


def sas_group(group_id: str, primary: str, secondary: str, **extra) -> dict:
    return {
        "enrollmentGroupId": group_id,
        "attestation": {
            "type": "symmetricKey",
            "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary},
        },
        **extra,
    }


def intermediate_of(root: TestCa, common_name: str) -> TestCa:
    """A CA whose certificate the root signed (TestCa signs leaves with its key and name)."""
    ca = TestCa(common_name)
    now = datetime.now(UTC)
    ca.certificate = (
        x509.CertificateBuilder()
        .subject_name(ca.name)
        .issuer_name(root.name)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    return ca


def device_with_chain(ca: TestCa, directory: Path, reg_id: str) -> tuple[Path, Path]:
    """A device key and a certificate file holding its leaf followed by ``ca``'s certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{reg_id}.pem", directory / f"{reg_id}.key"
    cert_path.write_bytes(ca.chain_pem(reg_id, key))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def x509_device(emu, reg_id: str, cert_path: Path, key_path: Path) -> ProvisioningDeviceClient:
    return ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=emu.dps_host,
        registration_id=reg_id,
        id_scope=emu.id_scope,
        x509=X509(str(cert_path), str(key_path)),
        server_verification_cert=emu.ca_pem,
    )


def sas_device(emu, reg_id: str, key: str, **kwargs) -> ProvisioningDeviceClient:
    return ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=emu.dps_host,
        registration_id=reg_id,
        id_scope=emu.id_scope,
        symmetric_key=key,
        server_verification_cert=emu.ca_pem,
        **kwargs,
    )


async def stored_telemetry(emu, hub: str, device_id: str) -> list[dict]:
    """The device's stored messages through the hub REST extension GET /devices/{id}/messages."""
    parts = dict(p.split("=", 1) for p in emu.hub_connection_string(hub).split(";"))
    auth = generate_sas(hub, parts["SharedAccessKey"], policy="iothubowner", expiry=int(time.time()) + 600)
    context = ssl.create_default_context(cadata=emu.ca_pem)
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"https://{parts['HostName']}/devices/{device_id}/messages",
            headers={"Authorization": auth},
            ssl=context,
        ) as response,
    ):
        assert response.status == 200
        return await response.json()


async def send_one(client: IoTHubDeviceClient, text: str) -> None:
    try:
        await asyncio.wait_for(client.connect(), TIMEOUT)
        await asyncio.wait_for(client.send_message(Message(text)), TIMEOUT)
    finally:
        await asyncio.wait_for(client.shutdown(), TIMEOUT)


@pytest.fixture
def registry(module_emulator, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(module_emulator.ca_path))

    def of(hub: str) -> IoTHubRegistryManager:
        return IoTHubRegistryManager.from_connection_string(module_emulator.hub_connection_string(hub))

    return of


async def hub_device(registry, hub: str, device_id: str):
    return await asyncio.to_thread(registry(hub).get_device, device_id)


async def nowhere(module_emulator, registry, device_id: str) -> bool:
    for hub in module_emulator.hub_hosts:
        try:
            await hub_device(registry, hub, device_id)
        except Exception as exc:  # msrest HttpOperationError
            assert getattr(getattr(exc, "response", None), "status_code", None) == 404, exc
        else:
            return False
    return True


# ------------------------------------------------------------------------------------ service REST API
async def test_group_create_get_update_with_etags_query_and_delete(dps, module_emulator):
    root = TestCa("group crud root")
    group_id = new_id("grp")
    hub = module_emulator.hub_hosts[1]
    created = await dps.enrollment_group.create_or_update(
        id=group_id,
        enrollment_group=x509_group(
            group_id, root.pem.decode(), iotHubHostName=hub, provisioningStatus="disabled"
        ),
    )
    info = created["attestation"]["x509"]["signingCertificates"]["primary"]["info"]
    assert info["subjectName"] == "CN=group crud root" and info["sha1Thumbprint"]
    assert created["enrollmentGroupId"] == group_id and created["provisioningStatus"] == "disabled"
    assert created["reprovisionPolicy"] == {"updateHubAssignment": True, "migrateDeviceData": True}
    assert "registrationState" not in created and created["etag"]
    assert await dps.enrollment_group.get(id=group_id) == created
    mechanism = await dps.enrollment_group.get_attestation_mechanism(id=group_id)
    assert mechanism["x509"]["signingCertificates"]["primary"]["info"] == info

    with pytest.raises(ResourceExistsError):
        await dps.enrollment_group.create_or_update(
            id=group_id, enrollment_group=x509_group(group_id, root.pem.decode())
        )
    with pytest.raises(HttpResponseError) as stale:
        await dps.enrollment_group.create_or_update(
            id=group_id, enrollment_group={**created, "provisioningStatus": "enabled"}, if_match="stale"
        )
    assert stale.value.status_code == 412
    # The GET result sent back (certificate by its info only) with its etag: updated.
    updated = await dps.enrollment_group.create_or_update(
        id=group_id, enrollment_group={**created, "provisioningStatus": "enabled"}, if_match=created["etag"]
    )
    assert updated["provisioningStatus"] == "enabled" and updated["etag"] != created["etag"]
    assert updated["createdDateTimeUtc"] == created["createdDateTimeUtc"]

    found = [g async for g in await dps.enrollment_group.query(query_specification={"query": "*"}, top=1)]
    assert group_id in [g["enrollmentGroupId"] for g in found]
    # Groups and individual enrollments are separate: the group id is no individual enrollment.
    with pytest.raises(ResourceNotFoundError):
        await dps.enrollment.get(id=group_id)

    with pytest.raises(HttpResponseError) as stale_delete:
        await dps.enrollment_group.delete(id=group_id, if_match=created["etag"])
    assert stale_delete.value.status_code == 412
    await dps.enrollment_group.delete(id=group_id, if_match=updated["etag"])
    with pytest.raises(ResourceNotFoundError):
        await dps.enrollment_group.get(id=group_id)
    with pytest.raises(ResourceNotFoundError):
        await dps.enrollment_group.delete(id=group_id)


async def test_group_bulk_create_conflict_and_delete(dps):
    ids = [new_id("bulkgrp") for _ in range(3)]
    groups = [sas_group(i, new_key(), new_key()) for i in ids]
    assert await dps.enrollment_group.run_bulk_operation(
        bulk_operation={"mode": "create", "enrollmentGroups": groups}
    ) == {"isSuccessful": True, "errors": []}
    again = await dps.enrollment_group.run_bulk_operation(
        bulk_operation={"mode": "create", "enrollmentGroups": groups[:1]}
    )
    assert again["isSuccessful"] is False
    assert [(e["enrollmentGroupId"], e["errorCode"]) for e in again["errors"]] == [(ids[0], 409201)]
    with pytest.raises(HttpResponseError) as too_many:
        await dps.enrollment_group.run_bulk_operation(
            bulk_operation={"mode": "create", "enrollmentGroups": groups * 4}
        )
    assert too_many.value.status_code == 400
    deleted = await dps.enrollment_group.run_bulk_operation(
        bulk_operation={"mode": "delete", "enrollmentGroups": groups}
    )
    assert deleted == {"isSuccessful": True, "errors": []}
    for group_id in ids:
        with pytest.raises(ResourceNotFoundError):
            await dps.enrollment_group.get(id=group_id)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda g: g.pop("attestation"),
        lambda g: g["attestation"].update(type="tpm", tpm={"endorsementKey": "AAAA"}),
        lambda g: g["attestation"]["x509"].update(
            clientCertificates=g["attestation"]["x509"].pop("signingCertificates")
        ),
        lambda g: g["attestation"]["x509"].update(caReferences={"primary": "my-ca"}),
        lambda g: g["attestation"]["x509"]["signingCertificates"]["primary"].update(certificate="not a cert"),
        lambda g: g.update(enrollmentGroupId="someone-else"),
        lambda g: g.update(iotHubHostName="not-linked.example"),
        lambda g: g.update(provisioningStatus="sometimes"),
    ],
)
async def test_bad_groups_are_400_and_write_nothing(dps, mutate):
    group_id = new_id("badgrp")
    body = x509_group(group_id, TestCa("bad group root").pem.decode())
    mutate(body)
    with pytest.raises(HttpResponseError) as info:
        await dps.enrollment_group.create_or_update(id=group_id, enrollment_group=body)
    assert info.value.status_code == 400
    assert info.value.response.json()["errorCode"] // 1000 == 400
    with pytest.raises(ResourceNotFoundError):
        await dps.enrollment_group.get(id=group_id)


async def test_bad_symmetric_keys_are_400(dps):
    group_id = new_id("badkey")
    for key in ("not base64!", base64.b64encode(b"short").decode()):
        with pytest.raises(HttpResponseError) as info:
            await dps.enrollment_group.create_or_update(
                id=group_id, enrollment_group=sas_group(group_id, key, new_key())
            )
        assert info.value.status_code == 400
    with pytest.raises(ResourceNotFoundError):
        await dps.enrollment_group.get(id=group_id)


# ----------------------------------------------------------------------------------- device registration
@pytest.mark.slow
async def test_x509_group_over_an_intermediate_registers_a_chain_then_telemetry(
    module_emulator, dps, registry, tmp_path
):
    root = TestCa("group root")
    intermediate = intermediate_of(root, "group intermediate")
    group_id = new_id("x509grp")
    hub = module_emulator.hub_hosts[1]
    await dps.enrollment_group.create_or_update(
        id=group_id,
        enrollment_group=x509_group(
            group_id,
            intermediate.certificate.public_bytes(serialization.Encoding.PEM).decode(),
            iotHubHostName=hub,
            initialTwin={"tags": {"fleet": "g1"}},
        ),
    )
    reg_id = new_id()
    cert_path, key_path = device_with_chain(intermediate, tmp_path, reg_id)
    result = await register_once(x509_device(module_emulator, reg_id, cert_path, key_path), TIMEOUT)
    assert result.status == "assigned"
    assert result.registration_state.assigned_hub == hub and result.registration_state.device_id == reg_id

    state = await dps.device_registration_state.get(id=reg_id)
    assert state["status"] == "assigned" and state["substatus"] == "initialAssignment"
    assert set(state) <= SERVICE_REGISTRATION_STATE  # the group and certificate: the device's answer only
    by_group = [s async for s in await dps.device_registration_state.query(id=group_id)]
    assert by_group == [state]

    device = await hub_device(registry, hub, reg_id)
    assert device.authentication.type == "selfSigned"
    twin = await asyncio.to_thread(registry(hub).get_twin, reg_id)
    assert twin.tags == {"fleet": "g1"}
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(cert_path), str(key_path)),
        hostname=hub,
        device_id=reg_id,
        server_verification_cert=module_emulator.ca_pem,
    )
    await send_one(client, "from a group device")
    assert [m["body"] for m in await stored_telemetry(module_emulator, hub, reg_id)] == [
        "from a group device"
    ]


@pytest.mark.slow
async def test_x509_group_refusals_write_nothing(module_emulator, dps, registry, tmp_path):
    root = TestCa("refusal root")
    group_id = new_id("x509grp")
    await dps.enrollment_group.create_or_update(
        id=group_id, enrollment_group=x509_group(group_id, root.pem.decode())
    )
    stranger = TestCa("another root")
    reg_id = new_id()
    cert_path, key_path = device_with_chain(stranger, tmp_path / "stranger", reg_id)  # chain to no group
    with pytest.raises(ClientError):
        await register_once(x509_device(module_emulator, reg_id, cert_path, key_path), TIMEOUT)
    named_other = new_id()
    cert_path, key_path = device_with_chain(root, tmp_path / "cn", named_other)  # CN is not the id used
    with pytest.raises(ClientError):
        await register_once(x509_device(module_emulator, reg_id, cert_path, key_path), TIMEOUT)
    for who in (reg_id, named_other):
        with pytest.raises(ResourceNotFoundError):
            await dps.device_registration_state.get(id=who)
        assert await nowhere(module_emulator, registry, who)
    assert [s async for s in await dps.device_registration_state.query(id=group_id)] == []


@pytest.mark.slow
async def test_a_group_device_cannot_sign_itself_another_registration_id(
    module_emulator, dps, registry, tmp_path
):
    """A device of the group holds a key its group's CA certified, but as an end entity (CA:FALSE): a
    certificate it signs for another id is no proof, though the signatures up to the group's CA verify."""
    root = TestCa("forgery root")
    group_id = new_id("x509grp")
    await dps.enrollment_group.create_or_update(
        id=group_id, enrollment_group=x509_group(group_id, root.pem.decode())
    )
    device_id, victim = new_id(), new_id()
    device_key = ec.generate_private_key(ec.SECP256R1())
    device_cert = x509.load_pem_x509_certificate(root.chain_pem(device_id, device_key))
    forged_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, victim)]))
        .issuer_name(device_cert.subject)
        .public_key(forged_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(device_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "forged.pem", tmp_path / "forged.key"
    cert_path.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (forged, device_cert)) + root.pem
    )
    key_path.write_bytes(
        forged_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ClientError):
        await register_once(x509_device(module_emulator, victim, cert_path, key_path), TIMEOUT)
    with pytest.raises(ResourceNotFoundError):
        await dps.device_registration_state.get(id=victim)
    assert await nowhere(module_emulator, registry, victim)


@pytest.mark.slow
async def test_disabled_individual_enrollment_keeps_a_group_device_out(
    module_emulator, dps, registry, tmp_path
):
    root = TestCa("disable root")
    group_id = new_id("x509grp")
    await dps.enrollment_group.create_or_update(
        id=group_id, enrollment_group=x509_group(group_id, root.pem.decode())
    )
    reg_id = new_id()
    cert_path, key_path = device_with_chain(root, tmp_path, reg_id)
    leaf_pem = cert_path.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    await dps.enrollment.create_or_update(
        id=reg_id, enrollment=individual_x509(reg_id, leaf_pem, provisioningStatus="disabled")
    )
    with pytest.raises(ClientError):
        await register_once(x509_device(module_emulator, reg_id, cert_path, key_path), TIMEOUT)
    state = await dps.device_registration_state.get(id=reg_id)
    assert state["status"] == "disabled" and "assignedHub" not in state
    assert await nowhere(module_emulator, registry, reg_id)

    # Deleting the individual enrollment deletes its registration state, and the group takes the device.
    await dps.enrollment.delete(id=reg_id)
    with pytest.raises(ResourceNotFoundError):
        await dps.device_registration_state.get(id=reg_id)
    result = await register_once(x509_device(module_emulator, reg_id, cert_path, key_path), TIMEOUT)
    assert result.status == "assigned"
    by_group = [s["registrationId"] async for s in await dps.device_registration_state.query(id=group_id)]
    assert by_group == [reg_id]


@pytest.mark.slow
async def test_symmetric_key_group_with_a_derived_key_then_telemetry_with_that_key(
    module_emulator, dps, registry
):
    group_id = new_id("sasgrp")
    primary, secondary = new_key(), new_key()
    await dps.enrollment_group.create_or_update(
        id=group_id, enrollment_group=sas_group(group_id, primary, secondary)
    )
    reg_id = new_id()
    device_key = derived_key(primary, reg_id)
    result = await register_once(sas_device(module_emulator, reg_id, device_key), TIMEOUT)
    assert result.status == "assigned"
    hub = result.registration_state.assigned_hub
    state = await dps.device_registration_state.get(id=reg_id)
    assert state["assignedHub"] == hub and set(state) <= SERVICE_REGISTRATION_STATE
    assert [s async for s in await dps.device_registration_state.query(id=group_id)] == [state]

    device = await hub_device(registry, hub, reg_id)
    assert device.authentication.type == "sas"
    assert device.authentication.symmetric_key.primary_key == device_key
    assert device.authentication.symmetric_key.secondary_key == derived_key(secondary, reg_id)
    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=device_key,
        hostname=hub,
        device_id=reg_id,
        server_verification_cert=module_emulator.ca_pem,
    )
    await send_one(client, "sas telemetry")
    assert [m["body"] for m in await stored_telemetry(module_emulator, hub, reg_id)] == ["sas telemetry"]

    # The secondary derived key registers too, over MQTT over WebSockets.
    again = await register_once(
        sas_device(module_emulator, reg_id, derived_key(secondary, reg_id), websockets=True), TIMEOUT
    )
    assert again.status == "assigned" and again.registration_state.assigned_hub == hub


@pytest.mark.slow
async def test_symmetric_key_refusals_write_nothing(module_emulator, dps, registry):
    group_id = new_id("sasgrp")
    primary = new_key()
    await dps.enrollment_group.create_or_update(
        id=group_id, enrollment_group=sas_group(group_id, primary, new_key())
    )
    reg_id = new_id()
    for key in (
        primary,
        derived_key(primary, new_id()),
        new_key(),
    ):  # the group key itself, another id's, random
        with pytest.raises(ClientError):
            await register_once(sas_device(module_emulator, reg_id, key), TIMEOUT)
    with pytest.raises(ResourceNotFoundError):
        await dps.device_registration_state.get(id=reg_id)
    assert await nowhere(module_emulator, registry, reg_id)


@pytest.mark.slow
async def test_symmetric_key_individual_enrollment_registers_with_its_key(module_emulator, dps, registry):
    reg_id = new_id()
    enrollment = await dps.enrollment.create_or_update(
        id=reg_id, enrollment={"registrationId": reg_id, "attestation": {"type": "symmetricKey"}}
    )
    keys = enrollment["attestation"]["symmetricKey"]  # generated by DPS
    with pytest.raises(ClientError):
        await register_once(sas_device(module_emulator, reg_id, new_key()), TIMEOUT)
    result = await register_once(sas_device(module_emulator, reg_id, keys["secondaryKey"]), TIMEOUT)
    assert result.status == "assigned"
    device = await hub_device(registry, result.registration_state.assigned_hub, reg_id)
    assert device.authentication.type == "sas"
    assert device.authentication.symmetric_key.primary_key == keys["primaryKey"]


@pytest.mark.slow
async def test_deleted_registration_state_lets_the_device_register_afresh(module_emulator, dps):
    group_id = new_id("sasgrp")
    primary = new_key()
    await dps.enrollment_group.create_or_update(
        id=group_id, enrollment_group=sas_group(group_id, primary, new_key())
    )
    reg_id = new_id()
    await register_once(sas_device(module_emulator, reg_id, derived_key(primary, reg_id)), TIMEOUT)
    first = await dps.device_registration_state.get(id=reg_id)
    with pytest.raises(HttpResponseError) as stale:
        await dps.device_registration_state.delete(id=reg_id, if_match="stale")
    assert stale.value.status_code == 412
    assert await dps.device_registration_state.get(id=reg_id) == first
    await dps.device_registration_state.delete(id=reg_id, if_match=first["etag"])
    assert [s async for s in await dps.device_registration_state.query(id=group_id)] == []

    result = await register_once(sas_device(module_emulator, reg_id, derived_key(primary, reg_id)), TIMEOUT)
    assert result.status == "assigned"
    fresh = await dps.device_registration_state.get(id=reg_id)
    assert fresh["substatus"] == "initialAssignment"
    assert fresh["createdDateTimeUtc"] > first["createdDateTimeUtc"]
    assert [s["registrationId"] async for s in await dps.device_registration_state.query(id=group_id)] == [
        reg_id
    ]


async def test_registration_state_paths_refuse_bad_ids(dps):
    for call in (
        dps.device_registration_state.get(id="bad id!"),
        dps.device_registration_state.delete(id="bad id!"),
    ):
        with pytest.raises(HttpResponseError) as info:
            await call
        assert info.value.status_code == 400
    with pytest.raises(HttpResponseError) as query:
        [s async for s in await dps.device_registration_state.query(id="bad id!")]
    assert query.value.status_code == 400


async def test_symmetric_key_over_the_device_https_api(module_emulator, dps):
    """The DPS device HTTPS API (C/Java/.NET SDKs, firmware): the SAS token in ``Authorization``."""
    group_id = new_id("sasgrp")
    primary = new_key()
    await dps.enrollment_group.create_or_update(
        id=group_id, enrollment_group=sas_group(group_id, primary, new_key())
    )
    reg_id = new_id()
    url = f"https://{module_emulator.dps_host}/{module_emulator.id_scope}/registrations/{reg_id}/register"
    context = ssl.create_default_context(cadata=module_emulator.ca_pem)
    expiry = int(time.time()) + 600
    resource = f"{module_emulator.id_scope}/registrations/{reg_id}"
    async with aiohttp.ClientSession() as session:

        async def put(key: str) -> tuple[int, dict]:
            token = generate_sas(resource, key, policy="registration", expiry=expiry)
            async with session.put(
                url,
                params={"api-version": "2021-06-01"},
                json={"registrationId": reg_id},
                headers={"Authorization": token},
                ssl=context,
            ) as response:
                return response.status, await response.json()

        status, body = await put(new_key())
        assert (status, body["errorCode"]) == (401, 401002)
        status, body = await put(derived_key(primary, reg_id))
    assert status in (200, 202) and body["operationId"]
    state = await dps.device_registration_state.get(id=reg_id)
    assert state["status"] == "assigned" and set(state) <= SERVICE_REGISTRATION_STATE
    assert [s async for s in await dps.device_registration_state.query(id=group_id)] == [state]
