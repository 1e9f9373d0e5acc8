"""Azure's identifier rules on every path, against a real emulator process with Microsoft's SDKs (and a
raw MQTT client for CONNECTs the SDK would not send): each invalid id is refused with Azure's status and
error code, and nothing is stored."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError
from azure.iot.hub import IoTHubRegistryManager
from msrest.exceptions import HttpOperationError
from support.dps_device import x509_enrollment
from support.mqtt_client import MqttTestClient, client_context

from azure_iot_emulator import ids
from azure_iot_emulator.mqtt import packets as p

# The ids the first review got the emulator to accept, and a few more of the same kind.
BAD_IDS = [
    "../../etc/passwd",
    "..",
    ".",
    "nul\x00byte",
    "new\nline",
    "x" * 200,
    "x' OR '1'='1",
    "with space",
    "ümlaut",
    "",
]
BAD_REGISTRATION_IDS = [*BAD_IDS, "ends-with-dot.", "plus+sign", "x" * 129]


@pytest.fixture
def registry(module_emulator, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(module_emulator.ca_path))
    return IoTHubRegistryManager.from_connection_string(module_emulator.hub_connection_strings[0])


def status_of(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


async def call(fn, *args):
    return await asyncio.to_thread(fn, *args)


async def all_enrollments(dps) -> list[str]:
    pager = await dps.enrollment.query(query_specification={"query": "*"})
    return sorted([e["registrationId"] async for e in pager])


def test_id_rules_unit():
    for good in ("a", "A" * 128, "dev:1.2+3%_#*?!(),=@;$'-x"):
        assert ids.is_device_id(good), good
    for bad in BAD_IDS:
        assert not ids.is_device_id(bad), bad
    for good in ("a", "Dev-1", "a.b_c:d-", "x" * 128):
        assert ids.is_registration_id(good), good
    for bad in BAD_REGISTRATION_IDS:
        assert not ids.is_registration_id(bad), bad


@pytest.mark.parametrize("bad", [b for b in BAD_IDS if b], ids=repr)
async def test_hub_rest_refuses_invalid_device_ids_and_stores_nothing(registry, bad):
    before = {d.device_id for d in await call(registry.get_devices, 1000)}
    with pytest.raises(HttpOperationError) as created:
        await call(registry.create_device_with_x509, bad, "ABCDEF" * 6 + "ABCD", None, "enabled")
    # 400 ArgumentInvalid, or (for ids an HTTP stack folds away, like '..') a path that names no device
    assert status_of(created.value) in (400, 404, 405)
    if status_of(created.value) == 400:
        assert created.value.response.headers["iothub-errorcode"] == "ArgumentInvalid"
    with pytest.raises(HttpOperationError):
        await call(registry.get_twin, bad)
    after = {d.device_id for d in await call(registry.get_devices, 1000)}
    assert after == before


async def test_hub_rest_accepts_every_allowed_character_and_ids_are_case_sensitive(registry):
    suffix = uuid.uuid4().hex[:8]
    odd = f"d:1.2+3_#*!(),=@;$'-{suffix}"
    thumb = "AB" * 20
    created = await call(registry.create_device_with_x509, odd, thumb, None, "enabled")
    assert created.device_id == odd
    assert (await call(registry.get_device, odd)).device_id == odd
    upper, lower = f"Case-{suffix}", f"case-{suffix}"
    await call(registry.create_device_with_x509, upper, thumb, None, "enabled")
    await call(registry.create_device_with_x509, lower, thumb, None, "enabled")
    assert (await call(registry.get_device, upper)).device_id == upper
    assert (await call(registry.get_device, lower)).device_id == lower
    longest = "L" * 120 + suffix
    created = await call(registry.create_device_with_x509, longest, thumb, None, "enabled")
    assert created.device_id == longest


@pytest.mark.parametrize("bad", [b for b in BAD_REGISTRATION_IDS if b and b not in (".", "..")], ids=repr)
async def test_dps_rest_refuses_invalid_registration_ids_and_stores_nothing(dps, ca, tmp_path, bad):
    pem = ca.issue(tmp_path, "any-device").pem
    before = await all_enrollments(dps)
    with pytest.raises(HttpResponseError) as put:
        await dps.enrollment.create_or_update(id=bad, enrollment=x509_enrollment(bad, pem))
    assert put.value.status_code == 400
    with pytest.raises(HttpResponseError) as got:
        await dps.enrollment.get(id=bad)
    assert got.value.status_code == 400
    with pytest.raises(HttpResponseError) as state:
        await dps.device_registration_state.get(id=bad)
    assert state.value.status_code == 400
    result = await dps.enrollment.run_bulk_operation(
        bulk_operation={"mode": "create", "enrollments": [x509_enrollment(bad, pem)]}
    )
    assert result["isSuccessful"] is False and result["errors"][0]["errorCode"] == 400004
    assert await all_enrollments(dps) == before


@pytest.mark.parametrize("bad", [b for b in BAD_IDS if b], ids=repr)
async def test_dps_refuses_an_enrollment_whose_hub_device_id_is_invalid(dps, ca, tmp_path, bad):
    reg_id = f"ok-{uuid.uuid4().hex[:8]}"
    pem = ca.issue(tmp_path, reg_id).pem
    with pytest.raises(HttpResponseError) as put:
        await dps.enrollment.create_or_update(
            id=reg_id, enrollment=x509_enrollment(reg_id, pem, deviceId=bad)
        )
    assert put.value.status_code == 400
    assert put.value.response.json()["errorCode"] == 400004


async def test_registration_ids_are_case_insensitive(dps, ca, tmp_path):
    reg_id = f"Mixed-{uuid.uuid4().hex[:8]}"
    pem = ca.issue(tmp_path, reg_id).pem
    await dps.enrollment.create_or_update(id=reg_id, enrollment=x509_enrollment(reg_id, pem))
    with pytest.raises(ResourceExistsError):
        lower = reg_id.lower()
        await dps.enrollment.create_or_update(id=lower, enrollment=x509_enrollment(lower, pem))
    assert (await dps.enrollment.get(id=reg_id.upper()))["registrationId"] == reg_id


# (A NUL is malformed in any MQTT string: the codec closes such a connection before any endpoint sees it.)
@pytest.mark.parametrize("bad", ["x' OR '1'='1", "with space", "x" * 200, "ends."], ids=repr)
async def test_mqtt_connect_with_an_invalid_id_is_identifier_rejected(module_emulator, ca, tmp_path, bad):
    cert = ca.issue(tmp_path, "mqtt-device")
    ctx = client_context(module_emulator.ca_pem, str(cert.cert_path), str(cert.key_path))
    usernames = [
        (module_emulator.dps_host, f"{module_emulator.id_scope}/registrations/{bad}/api-version=2019-03-31"),
    ]
    if bad != "ends.":  # a valid device id
        hub = module_emulator.hub_hosts[0]
        usernames.append((hub, f"{hub}/{bad}/?api-version=2021-04-12"))
    for host, username in usernames:
        client, ack = await MqttTestClient.connect(host, ctx, client_id=bad, username=username)
        try:
            assert ack == p.ConnAck(2), username
            assert await client.wait_closed()
        finally:
            await client.close()


@pytest.mark.parametrize(
    "patch",
    [
        {"tags": {"a.b": 1}},
        {"tags": {"$x": 1}},
        {"tags": {"with space": 1}},
        {"tags": {"ctl\x07": 1}},
        {"tags": {"k" * 1025: 1}},
        {"tags": {"big": "v" * 4097}},
        {"tags": {f"k{n}": "v" * 1000 for n in range(9)}},  # over 8 KB of tags
        {"properties": {"desired": {f"k{n}": "v" * 4000 for n in range(9)}}},  # over 32 KB desired
        {"tags": {"l1": {"l2": {"l3": {"l4": {"l5": {"l6": 1}}}}}}},  # deeper than 5
    ],
    ids=[
        "dot", "dollar", "space", "control", "long-name", "long-value", "tags-size", "desired-size", "depth",
    ],
)
async def test_hub_refuses_twin_names_and_sizes_azure_refuses_and_changes_nothing(registry, patch):
    from azure.iot.hub.models import Twin, TwinProperties

    device_id = f"tw-{uuid.uuid4().hex[:8]}"
    await call(registry.create_device_with_x509, device_id, "AB" * 20, None, "enabled")
    before = await call(registry.get_twin, device_id)
    desired = patch.get("properties", {}).get("desired")
    twin = Twin(tags=patch.get("tags"), properties=TwinProperties(desired=desired))
    with pytest.raises(HttpOperationError) as refused:
        await call(registry.update_twin, device_id, twin, "*")
    assert status_of(refused.value) == 400
    after = await call(registry.get_twin, device_id)
    assert (after.etag, after.version, after.tags) == (before.etag, before.version, before.tags)
