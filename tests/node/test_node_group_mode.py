"""Group mode with Microsoft's Node.js SDKs: factory_svc and activation_svc in group mode (the stack of
tests/activation/test_group_mode.py, ``activation.group_env``), the enrollment group written by the
operator's command, the emulator on its own loopback addresses running Azure's asynchronous assignment
(``202 assigning``, then polls).  A device of the factory's issuing CA registers through the group with
azure-iot-provisioning-device(-mqtt) and azure-iot-security-x509: DPS refuses it as Azure does while it is
not activated (the webhook said no), then assigns it the hub the webhook chose with the OEM's initial
twin; it connects with azure-iot-device-mqtt and its telemetry is read back with @azure/event-hubs.  The
group itself is read and written with azure-iot-provisioning-service and compared with what Python's
azure-iot-deviceprovisioning sees."""

from __future__ import annotations

import json

import pytest
import pytest_asyncio
from activation.group_env import META, dps_group, emulator_args, running_stack
from conftest import running_emulator
from enrollment.provisioning_env import OemTls, activate_request
from support.dps_device import SERVICE_REGISTRATION_STATE
from support.node_sdks import dps_client, eventhub_client, hub_client

from devprov.v1 import activation_service_pb2 as apb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

CUSTOM_ALLOCATION_FAILED = 400207  # Azure's errorCode when the webhook answers anything but 200 or 401


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return OemTls.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def azure_flow_emulator(tmp_path_factory, tls):
    """Azure's flow: the register request answered ``202 assigning``, the result after a poll."""
    data = tmp_path_factory.mktemp("emulator") / "data"
    with running_emulator(data, emulator_args(tls, assignment_delay="1")) as emulator:
        yield emulator


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory, azure_flow_emulator, tls):
    async with running_stack(tmp_path_factory.mktemp("stack"), azure_flow_emulator, tls) as stack:
        yield stack


def first_run(stack, device, messages: int) -> dict:
    """device_flow.js's input: register through the group, then report, read the twin, send telemetry."""
    return {
        "provisioningHost": stack.emulator.dps_host,
        "idScope": stack.emulator.id_scope,
        "registrationId": device.device_id,
        "certFile": str(device.cert_path),  # the leaf and the issuing CA, as the factory returned them
        "keyFile": str(device.key_path),
        "reported": {"firmware": "2.0.1"},
        "messages": messages,
        "intervalMs": 200,
    }


async def test_a_device_of_the_group_is_refused_until_activated_then_lands_on_the_oems_hub(stack, node_sdks):
    emulator = stack.emulator
    device, code = await stack.enrolled()
    writes_before = await stack.dps_writes()

    refused = await node_sdks.run(
        "device_flow.js", payload=first_run(stack, device, 3), ca_file=emulator.ca_path
    )
    # Azure's answer when the webhook refuses: the operation ends `failed` (topic status 200), errorCode
    # 400207 in the registration state; the Node SDK raises its DeviceRegistrationFailedError (named
    # ProvisioningRegistrationFailedError) with that body as its `result`.
    error = refused["error"]
    assert (error["name"], error["status"], error["result"]["status"]) == (
        "ProvisioningRegistrationFailedError",
        200,
        "failed",
    )
    state = error["result"]["registrationState"]
    assert (state["registrationId"], state["status"], state["errorCode"]) == (
        device.device_id,
        "failed",
        CUSTOM_ALLOCATION_FAILED,
    )
    assert "assignedHub" not in state
    assert stack.audit(device.device_id) == [("refused", "DEVICE_NOT_ACTIVATED")]
    for hub in emulator.hub_hosts:  # no hub has heard of it (azure-iothub's registry: 404)
        missing = await hub_client(node_sdks, emulator, hub)("get-twin", deviceId=device.device_id)
        assert missing["error"]["status"] == 404

    chosen = emulator.hub_hosts[1]  # not the hub hashing would pick for everyone: the OEM's choice
    reply = await stack.activation.Activate(
        activate_request(device.device_id, code, json.dumps(META), chosen)
    )
    assert reply.hub == chosen

    seen = await node_sdks.run(
        "device_flow.js", payload=first_run(stack, device, 3), ca_file=emulator.ca_path
    )
    assert seen["registration"] == {"assignedHub": chosen, "deviceId": device.device_id}
    registration = seen["registrationState"]
    assert (registration["status"], registration["substatus"]) == ("assigned", "initialAssignment")
    assert registration["x509"]["enrollmentGroupId"] == stack.group["group_id"]
    assert registration["x509"]["certificateInfo"]["subjectName"] == f"CN={device.device_id}"
    assert seen["desired"]["interval_s"] == META["properties"]["desired"]["interval_s"]  # the OEM's twin
    twin = await hub_client(node_sdks, emulator, chosen)("get-twin", deviceId=device.device_id)
    assert twin["tags"] == META["tags"] and twin["reported"]["firmware"] == "2.0.1"
    assert stack.audit(device.device_id)[-1] == ("ok", f"hub={chosen}")

    # its telemetry, read from the chosen hub's built-in endpoint with @azure/event-hubs
    events = await eventhub_client(node_sdks, emulator, chosen)(
        "read", count=3, deviceId=device.device_id, **{"from": {"earliest": True}}
    )
    assert [(e["body"]["seq"], e["messageId"]) for e in events] == [
        (m["seq"], m["messageId"]) for m in seen["sent"]
    ]
    assert {(e["contentType"], e["messageSource"]) for e in events} == {("application/json", "Telemetry")}

    # the group's registration states, through azure-iot-provisioning-service
    states = await dps_client(node_sdks, emulator)("group-registrations", id=stack.group["group_id"])
    (mine,) = [s for s in states if s["registrationId"] == device.device_id]
    assert (mine["status"], mine["assignedHub"], mine["deviceId"]) == ("assigned", chosen, device.device_id)
    assert mine["etag"] == registration["etag"]
    assert set(mine) <= SERVICE_REGISTRATION_STATE  # the certificate info went to the device only

    status = await stack.activation.GetDeviceStatus(
        apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
    )
    assert status.lifecycle == apb.LIFECYCLE_REGISTERED and status.registered_hub == chosen
    assert await stack.dps_writes() == writes_before  # no DPS service write for the device


async def test_the_group_read_and_written_with_the_node_service_sdk_as_python_sees_it(stack, node_sdks):
    emulator = stack.emulator
    dps = dps_client(node_sdks, emulator)
    group_id = stack.group["group_id"]

    node_view = await dps("get-group", id=group_id)
    assert node_view == await dps_group(emulator, group_id)
    assert node_view["etag"] == stack.group["etag"]
    assert node_view["allocationPolicy"] == "custom"
    assert node_view["customAllocationDefinition"]["webhookUrl"].startswith(stack.webhook)
    signing = node_view["attestation"]["x509"]["signingCertificates"]["primary"]
    assert signing["info"]["sha256Thumbprint"].upper() == stack.group["signing_certificate_sha256"].upper()

    # the back office narrows the group to one hub: what it read, written back under its etag (If-Match)
    one_hub = [emulator.hub_hosts[0]]
    written = await dps("put-group", group={**node_view, "iotHubs": one_hub})
    assert written["iotHubs"] == one_hub and written["etag"] != node_view["etag"]
    assert written["attestation"] == node_view["attestation"]  # the certificate kept, given by its info
    assert await dps_group(emulator, group_id) == written

    # a write under the etag it replaced: Azure's 412, and nothing changes
    stale = await dps("put-group", group={**node_view, "iotHubs": [emulator.hub_hosts[1]]})
    assert stale["error"]["status"] == 412
    assert await dps_group(emulator, group_id) == written

    # the operator's command puts the group back, guarded by the etag it reads
    restored = await stack.apply_group()
    assert restored["outcome"] == "updated" and sorted(restored["iot_hubs"]) == sorted(emulator.hub_hosts)
    assert (await dps("get-group", id=group_id))["etag"] == restored["etag"]
