"""Device registration with azure-iot-device's ProvisioningDeviceClient (aio), unchanged, over MQTT/TLS
against a real emulator process: assignment, the hub identity it creates, and every refusal."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.iot.device.aio import ProvisioningDeviceClient
from azure.iot.device.exceptions import ClientError
from azure.iot.hub import IoTHubRegistryManager
from support.dps_device import SERVICE_REGISTRATION_STATE, register_once, sdk_register
from support.dps_device import x509_enrollment as enrollment

TIMEOUT = 45


def new_id() -> str:
    return f"dev-{uuid.uuid4().hex[:12]}"


async def register(emu, reg_id: str, cert):
    return await sdk_register(emu, reg_id, cert, TIMEOUT)


async def hub_device(registry: IoTHubRegistryManager, device_id: str):
    return await asyncio.to_thread(registry.get_device, device_id)


async def hub_has_no_device(hubs: dict, device_id: str) -> bool:
    for registry in hubs.values():
        try:
            await hub_device(registry, device_id)
        except Exception as exc:  # msrest HttpOperationError
            assert getattr(getattr(exc, "response", None), "status_code", None) == 404, exc
        else:
            return False
    return True


@pytest.mark.slow
async def test_enabled_enrollment_is_assigned_with_hub_identity_and_initial_twin(
    module_emulator, dps, hubs, ca, tmp_path
):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id)
    hub = module_emulator.hub_hosts[1]
    await dps.enrollment.create_or_update(
        id=reg_id,
        enrollment=enrollment(
            reg_id,
            cert.pem,
            iotHubHostName=hub,
            deviceId=f"{reg_id}-hub",
            initialTwin={"tags": {"line": "A"}, "properties": {"desired": {"fw": "1.0"}}},
        ),
    )
    result = await register(module_emulator, reg_id, cert)
    assert result.status == "assigned"
    assert result.registration_state.assigned_hub == hub
    assert result.registration_state.device_id == f"{reg_id}-hub"
    assert result.registration_state.sub_status == "initialAssignment"

    device = await hub_device(hubs[hub], f"{reg_id}-hub")
    assert device.authentication.type == "selfSigned"
    assert device.authentication.x509_thumbprint.primary_thumbprint == cert.sha1
    assert device.status == "enabled"
    twin = await asyncio.to_thread(hubs[hub].get_twin, f"{reg_id}-hub")
    assert twin.tags == {"line": "A"}
    assert twin.properties.desired["fw"] == "1.0"

    state = await dps.device_registration_state.get(id=reg_id)
    assert state["status"] == "assigned" and state["assignedHub"] == hub
    assert state["deviceId"] == f"{reg_id}-hub"
    assert set(state) <= SERVICE_REGISTRATION_STATE  # the device's certificate info is the device's
    embedded = (await dps.enrollment.get(id=reg_id))["registrationState"]
    assert embedded == state


@pytest.mark.slow
async def test_hashed_allocation_is_deterministic_and_reregistration_keeps_the_assignment(
    module_emulator, dps, hubs, ca, tmp_path
):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id)
    await dps.enrollment.create_or_update(id=reg_id, enrollment=enrollment(reg_id, cert.pem))
    first = await register(module_emulator, reg_id, cert)
    assert first.registration_state.assigned_hub in module_emulator.hub_hosts
    second = await register(module_emulator, reg_id, cert)
    assert second.registration_state.assigned_hub == first.registration_state.assigned_hub
    assert second.registration_state.device_id == reg_id
    others = [h for h in module_emulator.hub_hosts if h != first.registration_state.assigned_hub]
    assert await hub_has_no_device({h: hubs[h] for h in others}, reg_id)


@pytest.mark.slow
async def test_enrollment_hub_change_moves_the_device_when_the_policy_allows(
    module_emulator, dps, hubs, ca, tmp_path
):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id)
    first_hub, second_hub = module_emulator.hub_hosts
    await dps.enrollment.create_or_update(
        id=reg_id, enrollment=enrollment(reg_id, cert.pem, iotHubHostName=first_hub)
    )
    assert (await register(module_emulator, reg_id, cert)).registration_state.assigned_hub == first_hub
    current = await dps.enrollment.get(id=reg_id)
    await dps.enrollment.create_or_update(
        id=reg_id, enrollment={**current, "iotHubHostName": second_hub}, if_match=current["etag"]
    )
    moved = await register(module_emulator, reg_id, cert)
    assert moved.registration_state.assigned_hub == second_hub
    assert moved.registration_state.sub_status == "deviceDataMigrated"
    assert await hub_has_no_device({first_hub: hubs[first_hub]}, reg_id)
    assert (await hub_device(hubs[second_hub], reg_id)).device_id == reg_id


@pytest.mark.slow
async def test_disabled_enrollment_fails_and_creates_no_hub_identity_until_enabled(
    module_emulator, dps, hubs, ca, tmp_path
):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id)
    created = await dps.enrollment.create_or_update(
        id=reg_id, enrollment=enrollment(reg_id, cert.pem, provisioningStatus="disabled")
    )
    with pytest.raises(ClientError):
        await register(module_emulator, reg_id, cert)
    assert await hub_has_no_device(hubs, reg_id)
    assert (await dps.device_registration_state.get(id=reg_id))["status"] == "disabled"

    await dps.enrollment.create_or_update(
        id=reg_id, enrollment={**created, "provisioningStatus": "enabled"}, if_match=created["etag"]
    )
    result = await register(module_emulator, reg_id, cert)
    assert result.status == "assigned"
    assert result.registration_state.sub_status == "initialAssignment"


async def test_unknown_registration_id_fails(module_emulator, ca, tmp_path, dps):
    reg_id = new_id()
    with pytest.raises(ClientError):
        await register(module_emulator, reg_id, ca.issue(tmp_path, reg_id))
    with pytest.raises(ResourceNotFoundError):
        await dps.device_registration_state.get(id=reg_id)


async def _refused(module_emulator, dps, hubs, reg_id, enrolled_pem, presented):
    await dps.enrollment.create_or_update(id=reg_id, enrollment=enrollment(reg_id, enrolled_pem))
    with pytest.raises(ClientError):
        await register(module_emulator, reg_id, presented)
    with pytest.raises(ResourceNotFoundError):
        await dps.device_registration_state.get(id=reg_id)
    assert await hub_has_no_device(hubs, reg_id)


async def test_wrong_certificate_fails(module_emulator, dps, hubs, ca, tmp_path):
    reg_id = new_id()
    enrolled = ca.issue(tmp_path / "a", reg_id)
    other = ca.issue(tmp_path / "b", reg_id)  # same CN, different key and thumbprint
    await _refused(module_emulator, dps, hubs, reg_id, enrolled.pem, other)


async def test_common_name_mismatch_fails(module_emulator, dps, hubs, ca, tmp_path):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id, common_name="somebody-else")
    await _refused(module_emulator, dps, hubs, reg_id, cert.pem, cert)


async def test_expired_and_not_yet_valid_leaves_fail(module_emulator, dps, hubs, ca, tmp_path):
    now = datetime.now(UTC)
    reg_id = new_id()
    expired = ca.issue(
        tmp_path, reg_id, not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
    )
    await _refused(module_emulator, dps, hubs, reg_id, expired.pem, expired)
    reg_id = new_id()
    future = ca.issue(
        tmp_path, reg_id, not_before=now + timedelta(days=1), not_after=now + timedelta(days=10)
    )
    await _refused(module_emulator, dps, hubs, reg_id, future.pem, future)


@pytest.mark.slow
async def test_self_signed_device_certificate_is_accepted(module_emulator, dps, ca, tmp_path):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id, self_signed=True)
    await dps.enrollment.create_or_update(id=reg_id, enrollment=enrollment(reg_id, cert.pem))
    assert (await register(module_emulator, reg_id, cert)).status == "assigned"


async def test_a_sas_token_for_an_x509_enrollment_is_refused(module_emulator, dps, hubs, ca, tmp_path):
    reg_id = new_id()
    await dps.enrollment.create_or_update(
        id=reg_id, enrollment=enrollment(reg_id, ca.issue(tmp_path, reg_id).pem)
    )
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=module_emulator.dps_host,
        registration_id=reg_id,
        id_scope=module_emulator.id_scope,
        symmetric_key="c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0IQ==",
        server_verification_cert=module_emulator.ca_pem,
    )
    with pytest.raises(ClientError):  # 401 on the register request: the enrollment wants a certificate
        await register_once(client, TIMEOUT)
    with pytest.raises(ResourceNotFoundError):
        await dps.device_registration_state.get(id=reg_id)
    assert await hub_has_no_device(hubs, reg_id)


@pytest.mark.slow
async def test_registration_state_delete_with_etag(module_emulator, dps, ca, tmp_path):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id)
    await dps.enrollment.create_or_update(id=reg_id, enrollment=enrollment(reg_id, cert.pem))
    await register(module_emulator, reg_id, cert)
    state = await dps.device_registration_state.get(id=reg_id)
    with pytest.raises(Exception) as stale:
        await dps.device_registration_state.delete(id=reg_id, if_match="stale")
    assert getattr(stale.value, "status_code", None) == 412
    await dps.device_registration_state.delete(id=reg_id, if_match=state["etag"])
    with pytest.raises(ResourceNotFoundError):
        await dps.device_registration_state.get(id=reg_id)
    assert "registrationState" not in await dps.enrollment.get(id=reg_id)
