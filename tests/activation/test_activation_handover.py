"""The three-party hand-over against a real emulator process, real factory_svc and activation_svc gRPC
servers (mTLS for the OEM), and Microsoft's SDKs for the device and for checking the cloud."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, timedelta

import grpc
import pytest
from azure.iot.device import Message
from azure.iot.device.exceptions import ClientError, CredentialError
from device.device_cloud import received_telemetry
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    connect_to_hub,
    dps_enrollment,
    enrolled,
    factory_env,
    failure,
    hub_session,
    hub_twin,
    register,
    running_activation,
    running_factory,
)

from devprov.v1 import activation_service_pb2 as apb
from provkit.cloud import parse_azure_time

pytestmark = pytest.mark.slow


async def send_one_message(emulator, device, hub: str, body: bytes) -> None:
    """Connect as the device, send one device-to-cloud message (acknowledged), disconnect."""
    async with hub_session(emulator, device, hub) as client:
        await asyncio.wait_for(client.send_message(Message(body)), 60)


META = {"tags": {"customer": "acme", "line": {"hall": 3}}, "properties": {"desired": {"interval_s": 5}}}


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def tls(tmp_path):
    return OemTls.create(tmp_path / "oem-tls")


@pytest.fixture
async def stack(tmp_path, emulator, tls):
    async with (
        running_factory(factory_env(tmp_path, emulator)) as (_factory_app, factory),
        running_activation(
            activation_env(tmp_path, emulator, tls, ACTIVATION_LIMITS_MAX_FAILURES="3"), tls
        ) as (activation_app, activation),
    ):
        yield emulator, factory, activation, activation_app


async def test_whole_handover_mint_enroll_refused_activate_register_twin(stack, tmp_path, tls):
    emulator, factory, activation, app = stack
    device, code = await enrolled(factory, tmp_path)

    with pytest.raises(ClientError):  # enrolled disabled: DPS refuses the device
        await register(emulator, device)
    status = await activation.GetDeviceStatus(
        apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
    )
    assert status.lifecycle == apb.LIFECYCLE_ENROLLED and status.provisioning_status == "disabled"

    chosen = emulator.hub_hosts[1]  # not the default hub
    reply = await activation.Activate(
        activate_request(device.device_id, code.lower(), json.dumps(META), chosen)
    )
    assert reply.path == apb.ACTIVATION_PATH_ENROLLMENT
    assert reply.lifecycle == apb.LIFECYCLE_ACTIVATED and reply.hub == chosen
    enrollment = await dps_enrollment(emulator, device.device_id)
    assert enrollment["provisioningStatus"] == "enabled"
    assert enrollment["allocationPolicy"] == "static" and enrollment["iotHubs"] == [chosen]

    result = await register(emulator, device)
    assert result.status == "assigned" and result.registration_state.assigned_hub == chosen
    twin = await hub_twin(emulator, chosen, device.device_id)
    assert twin.tags == META["tags"]
    assert twin.properties.desired["interval_s"] == 5

    status = await activation.GetDeviceStatus(
        apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
    )
    assert status.lifecycle == apb.LIFECYCLE_REGISTERED
    assert status.registered_hub == chosen and status.allocated_hub == chosen
    assert status.hub_device_status == "enabled" and status.last_activity_time.seconds > 0

    # "last activity" is the hub's lastActivityTime, which telemetry moves (as on Azure)
    before = status.last_activity_time.ToDatetime(tzinfo=UTC)
    await send_one_message(emulator, device, chosen, b'{"seq": 1}')
    (message,) = await received_telemetry(emulator, device.device_id, chosen)
    status = await activation.GetDeviceStatus(
        apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
    )
    enqueued = parse_azure_time(message["enqueued_time"])
    assert enqueued is not None and enqueued > before
    # the hub's last activity is the message's enqueued time (which AMQP carries in milliseconds)
    assert abs(status.last_activity_time.ToDatetime(tzinfo=UTC) - enqueued) < timedelta(milliseconds=1)

    audit = await app.audit.entries(device.device_id)
    assert [(e.action, e.outcome) for e in audit] == [("activate", "ok")]
    assert audit[0].caller.startswith(f"urn:devprov:oem:acme {tls.client_cn} sha256:")
    assert code not in json.dumps([e.detail for e in audit])


async def test_activation_after_registration_reaches_the_hub_twin_and_replays(stack, tmp_path):
    emulator, factory, activation, _app = stack
    device, code = await enrolled(factory, tmp_path)
    hub = emulator.default_hub
    first = await activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
    assert first.hub == hub
    assert (await register(emulator, device)).status == "assigned"

    again = await activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
    assert again.path == apb.ACTIVATION_PATH_UNCHANGED and again.enrollment_etag == first.enrollment_etag

    changed = {"tags": {"customer": "acme", "site": "north"}, "properties": {"desired": {"interval_s": 10}}}
    reply = await activation.Activate(
        activate_request(device.device_id, code, json.dumps(changed), request_id="r-1")
    )
    assert reply.path == apb.ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN
    assert reply.lifecycle == apb.LIFECYCLE_REGISTERED and reply.registered_hub == hub
    twin = await hub_twin(emulator, hub, device.device_id)
    assert twin.tags == {"customer": "acme", "site": "north"}  # "line" was removed
    assert twin.properties.desired["interval_s"] == 10
    enrollment = await dps_enrollment(emulator, device.device_id)
    assert enrollment["initialTwin"]["tags"] == changed["tags"]

    replay = await activation.Activate(
        activate_request(device.device_id, code, json.dumps(changed), request_id="r-1")
    )
    assert replay.replayed and replay.enrollment_etag == reply.enrollment_etag
    reused = await failure(
        activation.Activate(activate_request(device.device_id, code, json.dumps(META), request_id="r-1"))
    )
    assert reused.code is grpc.StatusCode.INVALID_ARGUMENT and reused.reason == "REQUEST_ID_REUSED"


async def test_wrong_code_and_unknown_device_look_the_same_and_are_rate_limited(stack, tmp_path):
    emulator, factory, activation, app = stack
    device, code = await enrolled(factory, tmp_path)
    before = await dps_enrollment(emulator, device.device_id)
    # a code that cannot be a code is a typo, refused unread (and never counted), for any device
    for device_id in (device.device_id, new_id()):
        malformed = await failure(activation.Activate(activate_request(device_id, "not a code", "{}")))
        assert malformed.code is grpc.StatusCode.INVALID_ARGUMENT
        assert malformed.reason == "ACTIVATION_CODE_MALFORMED"
    wrong = await failure(
        activation.Activate(activate_request(device.device_id, "0000-0000-0000-0000", "{}"))
    )
    unknown = await failure(activation.Activate(activate_request(new_id(), code, "{}")))
    missing = await failure(activation.Activate(activate_request(device.device_id, "", "{}")))
    other = await failure(
        activation.Activate(activate_request(device.device_id, "1111-1111-1111-1111", "{}"))
    )
    for denied in (wrong, unknown, missing, other):
        assert denied.code is grpc.StatusCode.PERMISSION_DENIED and denied.reason == "ACTIVATION_DENIED"
        assert denied.message == wrong.message
    limited = await failure(activation.Activate(activate_request(device.device_id, code, "{}")))
    assert limited.code is grpc.StatusCode.RESOURCE_EXHAUSTED and limited.reason == "ACTIVATION_RATE_LIMITED"
    assert limited.retry_after is not None and limited.retry_after > 0
    after = await dps_enrollment(emulator, device.device_id)
    assert after["etag"] == before["etag"] and after["provisioningStatus"] == "disabled"
    outcomes = [e.outcome for e in await app.audit.entries(device.device_id)]
    assert outcomes == ["denied", "denied", "denied", "rate-limited"]


async def test_bad_input_is_refused_with_field_violations_and_changes_nothing(stack, tmp_path):
    emulator, factory, activation, _app = stack
    device, code = await enrolled(factory, tmp_path)
    before = await dps_enrollment(emulator, device.device_id)
    bad_meta = await failure(
        activation.Activate(
            activate_request(device.device_id, code, json.dumps({"tags": {"a.b": 1, "$x": 2}}))
        )
    )
    assert bad_meta.code is grpc.StatusCode.INVALID_ARGUMENT and bad_meta.reason == "METADATA_INVALID"
    assert {v.field for v in bad_meta.field_violations} == {"metadata_json.tags.a.b", "metadata_json.tags.$x"}
    too_big = {"properties": {"desired": {f"k{i}": "x" * 1000 for i in range(40)}}}
    big = await failure(activation.Activate(activate_request(device.device_id, code, json.dumps(too_big))))
    assert big.reason == "METADATA_INVALID"
    not_json = await failure(activation.Activate(activate_request(device.device_id, code, "{tags:")))
    assert not_json.reason == "METADATA_NOT_JSON"
    hub = await failure(
        activation.Activate(activate_request(device.device_id, code, "{}", "elsewhere.example"))
    )
    assert hub.reason == "HUB_UNKNOWN" and hub.field_violations[0].field == "hub"
    bad_id = await failure(activation.Activate(activate_request("bad id!", code, "{}")))
    assert bad_id.reason == "DEVICE_ID_NOT_A_GUID"
    assert [v.field for v in bad_id.field_violations] == ["device_id"]
    assert (await dps_enrollment(emulator, device.device_id))["etag"] == before["etag"]


async def test_five_concurrent_changes_one_wins_the_others_are_aborted_and_may_retry(stack, tmp_path):
    emulator, factory, activation, app = stack
    device, code = await enrolled(factory, tmp_path)
    first = await activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
    hub = (await register(emulator, device)).registration_state.assigned_hub
    metas = [
        {"tags": {"writer": i, "customer": "acme"}, "properties": {"desired": {"n": i}}} for i in range(5)
    ]

    def change(meta, etag, request_id):
        request = activate_request(device.device_id, code, json.dumps(meta), request_id=request_id)
        request.expected_enrollment_etag = etag
        return activation.Activate(request)

    async def outcome(call):
        try:
            return await call
        except grpc.aio.AioRpcError:
            return await failure(call)

    outcomes = await asyncio.gather(
        *(outcome(change(m, first.enrollment_etag, f"c-{i}")) for i, m in enumerate(metas))
    )
    won = [i for i, o in enumerate(outcomes) if isinstance(o, apb.ActivateResponse)]
    assert len(won) == 1
    winner = won[0]
    assert outcomes[winner].path == apb.ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN
    for i, lost in enumerate(outcomes):
        if i != winner:
            assert (lost.code, lost.reason) == (grpc.StatusCode.ABORTED, "ENROLLMENT_CHANGED_CONCURRENTLY")
            assert lost.metadata["enrollment_etag"] == outcomes[winner].enrollment_etag
    enrollment = await dps_enrollment(emulator, device.device_id)
    assert enrollment["etag"] == outcomes[winner].enrollment_etag
    assert enrollment["initialTwin"]["tags"] == metas[winner]["tags"]
    twin = await hub_twin(emulator, hub, device.device_id)
    assert twin.tags == metas[winner]["tags"]  # META's "line" is gone too
    assert twin.properties.desired["n"] == winner and "interval_s" not in twin.properties.desired
    audit = await app.audit.entries(device.device_id)
    assert sorted((e.request_id, e.outcome) for e in audit[1:]) == sorted(
        (f"c-{i}", "ok" if i == winner else "error") for i in range(5)
    )
    assert all("ENROLLMENT_CHANGED_CONCURRENTLY" in e.detail for e in audit[1:] if e.outcome == "error")

    # the same metadata against the old etag is the no-op it always was; a loser retries on the new state
    same = await change(metas[winner], first.enrollment_etag, "c-same")
    assert same.path == apb.ACTIVATION_PATH_UNCHANGED
    loser = (winner + 1) % 5
    retry = await change(metas[loser], lost.metadata["enrollment_etag"], "c-retry")
    assert retry.path == apb.ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN
    assert (await hub_twin(emulator, hub, device.device_id)).tags == metas[loser]["tags"]


async def test_changes_without_an_expected_etag_never_overwrite_each_other_silently(stack, tmp_path):
    """Without an etag the state read at authorisation is the basis: a writer that finds another's metadata
    in DPS at its write is aborted instead of writing on top."""
    emulator, factory, activation, _app = stack
    device, code = await enrolled(factory, tmp_path)
    metas = [{"tags": {"writer": i}} for i in range(5)]

    async def outcome(meta):
        call = activation.Activate(activate_request(device.device_id, code, json.dumps(meta)))
        try:
            return await call
        except grpc.aio.AioRpcError:
            return await failure(call)

    outcomes = await asyncio.gather(*(outcome(m) for m in metas))
    won = [o for o in outcomes if isinstance(o, apb.ActivateResponse)]
    lost = [o for o in outcomes if not isinstance(o, apb.ActivateResponse)]
    assert won and all(o.reason == "ENROLLMENT_CHANGED_CONCURRENTLY" for o in lost)
    etags = [o.enrollment_etag for o in won]
    assert len(set(etags)) == len(etags)  # each success wrote over a state it had read, never over another's
    final = await dps_enrollment(emulator, device.device_id)
    assert final["etag"] in etags and final["provisioningStatus"] == "enabled"


async def test_deactivate_stops_registering_and_connecting(stack, tmp_path):
    emulator, factory, activation, _app = stack
    device, code = await enrolled(factory, tmp_path)
    await activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
    result = await register(emulator, device)
    hub = result.registration_state.assigned_hub
    await connect_to_hub(emulator, device, hub)

    reply = await activation.Deactivate(
        apb.DeactivateRequest(device_id=device.device_id, activation_code=code)
    )
    assert reply.changed and reply.hub_device_disabled and reply.lifecycle == apb.LIFECYCLE_DEPROVISIONED
    with pytest.raises(ClientError):
        await register(emulator, device)
    with pytest.raises((CredentialError, ClientError)):
        await connect_to_hub(emulator, device, hub)
    status = await activation.GetDeviceStatus(
        apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
    )
    assert status.lifecycle == apb.LIFECYCLE_DEPROVISIONED and status.hub_device_status == "disabled"
    assert status.deactivated_time.seconds > 0
    again = await activation.Deactivate(
        apb.DeactivateRequest(device_id=device.device_id, activation_code=code)
    )
    assert not again.changed and not again.hub_device_disabled
