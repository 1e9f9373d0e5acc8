"""Microsoft's Node.js SDKs as a second, independent client, with the emulator's own connection strings
(Azure's shape, ``HostName=<host>`` with no port) and its CA in NODE_EXTRA_CA_CERTS: the seed's device flow
for a device our factory minted and our activation service activated; DPS enrollments with
azure-iot-provisioning-service; a hub's registry and twins with azure-iothub.  What Node did is checked
through the Python SDKs and the emulator's telemetry store, what Python did through Node."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid

import pytest
from device.device_cloud import received_telemetry
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    dps_enrollment,
    enrolled,
    factory_env,
    hub_twin,
    registry,
    running_activation,
    running_factory,
)
from support.dps_device import x509_enrollment
from support.node_sdks import dps_client, hub_client

from devprov.v1 import activation_service_pb2 as apb

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

META = {
    "tags": {"customer": "acme", "machine": "press-7"},
    "properties": {"desired": {"telemetryIntervalSeconds": 5, "recipe": {"name": "steel", "v": 3}}},
}


async def test_the_seeds_device_flow_with_the_node_sdks(tmp_path, module_emulator, node_sdks):
    emulator = module_emulator
    tls = OemTls.create(tmp_path / "oem-tls")
    hub = emulator.hub_hosts[1]  # the OEM chooses the second hub
    async with (
        running_factory(factory_env(tmp_path, emulator)) as (_factory_app, factory),
        running_activation(activation_env(tmp_path, emulator, tls), tls) as (_activation_app, activation),
    ):
        device, code = await enrolled(factory, tmp_path)
        reply = await activation.Activate(activate_request(device.device_id, code, json.dumps(META), hub))
        assert reply.lifecycle == apb.LIFECYCLE_ACTIVATED and reply.hub == hub

        reported = {"firmware": "1.4.2", "telemetryIntervalSeconds": 5}
        seen = await node_sdks.run(
            "device_flow.js",
            payload={
                "provisioningHost": emulator.dps_host,
                "idScope": emulator.id_scope,
                "registrationId": device.device_id,
                "certFile": str(device.cert_path),
                "keyFile": str(device.key_path),
                "reported": reported,
                "messages": 3,
                "intervalMs": 500,
            },
            ca_file=emulator.ca_path,
        )
        status = await activation.GetDeviceStatus(
            apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
        )

    assert seen["registration"] == {"assignedHub": hub, "deviceId": device.device_id}
    assert seen["desired"]["recipe"] == {"name": "steel", "v": 3}  # the OEM's metadata, via the twin
    assert [m["seq"] for m in seen["sent"]] == [1, 2, 3]
    assert status.lifecycle == apb.LIFECYCLE_REGISTERED and status.registered_hub == hub
    # What the hub stored, read with the Python SDK and the emulator's telemetry API.
    messages = await received_telemetry(emulator, device.device_id, hub)
    assert [(m["seq"], m["message_id"]) for m in messages] == [
        (m["seq"], m["messageId"]) for m in seen["sent"]
    ]
    assert {m["content_type"] for m in messages} == {"application/json"}
    twin = await hub_twin(emulator, hub, device.device_id)
    assert twin.tags == META["tags"]
    assert {k: twin.properties.reported[k] for k in reported} == reported
    # The back office's view of the same twin through azure-iothub (Node).
    node_twin = await hub_client(node_sdks, emulator, hub)("get-twin", deviceId=device.device_id)
    assert node_twin["tags"] == META["tags"] and node_twin["reported"]["firmware"] == "1.4.2"


async def test_dps_enrollments_with_the_node_service_sdk(tmp_path, module_emulator, node_sdks, ca):
    emulator = module_emulator

    dps = dps_client(node_sdks, emulator)
    async with running_factory(factory_env(tmp_path, emulator)) as (_app, factory):
        minted, _code = await enrolled(factory, tmp_path)
    # get: the enrollment our factory wrote through the Python SDK
    got = await dps("get", id=minted.device_id)
    assert got["registrationId"] == minted.device_id and got["provisioningStatus"] == "disabled"
    assert got["etag"] == (await dps_enrollment(emulator, minted.device_id))["etag"]

    # create: read back through the Python SDK
    reg_id = f"node-{uuid.uuid4().hex[:12]}"
    cert = ca.issue(tmp_path, reg_id)
    body = x509_enrollment(
        reg_id,
        cert.pem,
        provisioningStatus="enabled",
        allocationPolicy="static",
        iotHubs=[emulator.default_hub],
    )
    created = await dps("create", enrollment=body)
    assert created["registrationId"] == reg_id and created["etag"]
    python_view = await dps_enrollment(emulator, reg_id)
    assert python_view["iotHubs"] == [emulator.default_hub] and python_view["etag"] == created["etag"]

    # query: paged one enrollment at a time, following the continuation tokens
    found = await dps("query", query="SELECT * FROM enrollments", pageSize=1)
    assert len(found["pages"]) >= 2 and all(len(page) <= 1 for page in found["pages"])
    listed = [reg for page in found["pages"] for reg in page]
    assert {minted.device_id, reg_id} <= set(listed) and len(listed) == len(set(listed))

    # delete: a stale etag is refused with Azure's 412 and nothing changes; the current one deletes
    stale = await dps("delete", id=reg_id, etag='"0000"')
    assert stale["error"]["status"] == 412
    assert await dps_enrollment(emulator, reg_id) is not None
    assert await dps("delete", id=reg_id, etag=created["etag"]) == {"deleted": reg_id}
    assert await dps_enrollment(emulator, reg_id) is None
    assert (await dps("get", id=reg_id))["error"]["status"] == 404


async def test_hub_registry_and_twins_with_azure_iothub(module_emulator, node_sdks):
    emulator = module_emulator
    hub = emulator.default_hub
    manager = registry(emulator, hub)
    ids = [f"node-hub-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    for device_id in ids:
        keys = [base64.b64encode(os.urandom(32)).decode() for _ in range(2)]
        await asyncio.to_thread(manager.create_device_with_sas, device_id, *keys, "enabled")

    node = hub_client(node_sdks, emulator, hub)
    assert set(ids) <= set(await node("list"))
    twin = await node("get-twin", deviceId=ids[0])
    assert twin["deviceId"] == ids[0] and twin["etag"]
    patch = {"tags": {"site": "north"}, "properties": {"desired": {"interval": 10}}}
    updated = await node("update-twin", deviceId=ids[0], patch=patch, etag=twin["etag"])
    assert updated["tags"] == {"site": "north"} and updated["desired"]["interval"] == 10
    assert updated["etag"] != twin["etag"]
    python_view = await hub_twin(emulator, hub, ids[0])
    assert python_view.tags == {"site": "north"} and python_view.properties.desired["interval"] == 10
    # the etag it replaced no longer matches: Azure's 412, nothing changed
    stale = await node("update-twin", deviceId=ids[0], patch={"tags": {"site": "south"}}, etag=twin["etag"])
    assert stale["error"]["status"] == 412
    assert (await hub_twin(emulator, hub, ids[0])).tags == {"site": "north"}
    # the other device's twin is untouched
    assert (await node("get-twin", deviceId=ids[1]))["tags"] in (None, {})
