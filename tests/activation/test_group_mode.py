"""Group mode against a real emulator process: factory_svc and activation_svc in group mode (their gRPC
servers, activation_svc's allocation webhook over TLS), the enrollment group written by the operator's
command (`factory-svc enrollment-group`, a process, through azure-iot-deviceprovisioning), devices
registering with Microsoft's azure-iot-device, the emulator's DPS calling the webhook as Azure does, and
the emulator's own count of DPS service writes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid

import pytest
import pytest_asyncio
from azure.iot.device import Message
from azure.iot.device.exceptions import ClientError
from conftest import running_emulator
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    dps_enrollment,
    hub_session,
    hub_twin,
    mint,
    register,
    running_activation,
)
from enrollment.provisioning_env import (
    registry as hub_registry,
)
from group_env import META, Stack, emulator_args, running_stack, runtime_context, sha256_of
from support.metrics import scrape
from support.waiting import until

from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import factory_service_pb2 as fpb

HTTP = "devprov_http_requests_total"

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return OemTls.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def group_emulator(tmp_path_factory, tls):
    with running_emulator(tmp_path_factory.mktemp("emulator") / "data", emulator_args(tls)) as emu:
        yield emu


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory, group_emulator, tls):
    root = tmp_path_factory.mktemp("stack")
    async with running_stack(root, group_emulator, tls, ACTIVATION_METRICS_LISTEN="127.0.0.1:0") as stack:
        yield stack


async def refused(stack: Stack, device) -> None:
    with pytest.raises(ClientError):
        await register(stack.emulator, device)


async def on_no_hub(stack: Stack, device_id: str) -> None:
    """No hub has an identity for the device (azure-iot-hub's registry answers 404 on each)."""
    from msrest.exceptions import HttpOperationError

    for hub in stack.emulator.hub_hosts:
        with pytest.raises(HttpOperationError) as missing:
            await asyncio.to_thread(lambda h=hub: hub_registry(stack.emulator, h).get_device(device_id))
        assert missing.value.response.status_code == 404


async def test_the_operator_command_is_idempotent_and_writes_the_group(stack):
    writes = await stack.dps_writes()
    again = await stack.apply_group()
    assert again["outcome"] == "unchanged" and "code=" not in again["webhook_url"]
    assert await stack.dps_writes() == writes  # unchanged: nothing written
    moved = await stack.apply_group("--hub", stack.emulator.hub_hosts[1])
    assert moved["outcome"] == "updated" and moved["iot_hubs"] == [stack.emulator.hub_hosts[1]]
    assert moved["etag"] != again["etag"] and await stack.dps_writes() == writes + 1
    back = await stack.apply_group()
    assert back["outcome"] == "updated" and sorted(back["iot_hubs"]) == sorted(stack.emulator.hub_hosts)


async def test_mint_enroll_activate_boot_and_telemetry_with_no_dps_write_per_device(stack):
    writes_before = await stack.dps_writes()
    device, code = await stack.enrolled()
    assert await dps_enrollment(stack.emulator, device.device_id) is None  # no individual enrollment

    await refused(stack, device)  # not activated yet: the webhook refuses
    assert stack.audit(device.device_id) == [("refused", "DEVICE_NOT_ACTIVATED")]

    chosen = stack.emulator.hub_hosts[1]
    reply = await stack.activation.Activate(
        activate_request(device.device_id, code, json.dumps(META), chosen)
    )
    assert reply.hub == chosen

    result = await register(stack.emulator, device)
    assert result.status == "assigned" and result.registration_state.assigned_hub == chosen
    twin = await hub_twin(stack.emulator, chosen, device.device_id)
    assert twin.tags == META["tags"] and twin.properties.desired["interval_s"] == 5
    async with hub_session(stack.emulator, device, chosen) as client:
        await asyncio.wait_for(client.send_message(Message(b'{"t": 21.5}')), 60)
    assert stack.audit(device.device_id)[-1] == ("ok", f"hub={chosen}")

    status = await stack.activation.GetDeviceStatus(
        apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
    )
    assert status.lifecycle == apb.LIFECYCLE_REGISTERED and status.registered_hub == chosen
    assert await stack.dps_writes() == writes_before  # the emulator's count: 0 DPS writes for the device


async def test_unknown_and_unactivated_devices_are_refused_alike_and_audited(stack):
    unknown = await mint(stack.factory, str(uuid.uuid4()), stack.root / "devices")  # never enrolled
    waiting, _code = await stack.enrolled()
    await refused(stack, unknown)
    await refused(stack, waiting)
    assert stack.audit(unknown.device_id) == [("refused", "DEVICE_UNKNOWN")]
    assert stack.audit(waiting.device_id) == [("refused", "DEVICE_NOT_ACTIVATED")]

    # on the wire, to whoever holds the key: one answer for both
    answers = [
        await stack.post(runtime_context(d.device_id, f"CN={d.device_id}", sha256_of(d), stack))
        for d in (unknown, waiting)
    ]
    assert answers[0] == answers[1] and answers[0][0] == 403
    for device in (unknown, waiting):
        await on_no_hub(stack, device.device_id)


async def test_revoked_and_deprovisioned_devices_are_refused(stack):
    revoked, code = await stack.enrolled()
    await stack.activation.Activate(activate_request(revoked.device_id, code, json.dumps(META)))
    await stack.factory.RevokeCertificate(
        fpb.RevokeCertificateRequest(device_id=revoked.device_id, reason=fpb.REVOCATION_REASON_KEY_COMPROMISE)
    )

    async def disabled() -> bool:
        record = await stack.activation_app.dps.get(revoked.device_id)
        return record is not None and not record.enabled

    await until(disabled, "the revocation disables the device's record")
    await refused(stack, revoked)
    assert stack.audit(revoked.device_id)[-1] == ("refused", "DEVICE_REVOKED")

    gone, code = await stack.enrolled()
    await stack.activation.Activate(activate_request(gone.device_id, code, json.dumps(META)))
    await stack.activation.Deactivate(apb.DeactivateRequest(device_id=gone.device_id, activation_code=code))
    await refused(stack, gone)
    assert stack.audit(gone.device_id) == [("refused", "DEVICE_DEPROVISIONED")]


async def test_a_wrong_key_or_a_registration_id_not_the_certificates_is_refused(stack):
    device, code = await stack.enrolled()
    await stack.activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
    other, _ = await stack.enrolled()
    right = runtime_context(device.device_id, f"CN={device.device_id}", sha256_of(device), stack)
    metrics_before = await scrape(stack.activation_app.observe.metrics_url)

    status, _ = await stack.post(right, key="not-the-key-at-all-0000000000")
    assert status == 401
    with sqlite3.connect(stack.activation_dir / "audit.sqlite3") as db:
        (last,) = db.execute("SELECT detail FROM audit WHERE action = 'allocate' ORDER BY id DESC LIMIT 1")
    assert last == ("FUNCTION_KEY_WRONG",)

    # another device's certificate claiming this device's id
    claimed = runtime_context(device.device_id, f"CN={other.device_id}", sha256_of(other), stack)
    assert (await stack.post(claimed))[0] == 403
    # this device's id and name, another device's certificate
    swapped = runtime_context(device.device_id, f"CN={device.device_id}", sha256_of(other), stack)
    assert (await stack.post(swapped))[0] == 403
    assert stack.audit(device.device_id) == [
        ("refused", "REGISTRATION_ID_MISMATCH"),
        ("refused", "CERTIFICATE_NOT_ENROLLED"),
    ]
    assert (await stack.post(right))[0] == 200  # the real one passes

    # every answer counted on activation_svc's /metrics, by status
    metrics_after = await scrape(stack.activation_app.observe.metrics_url)
    answered = {
        status: metrics_after.value(HTTP, route="/api/allocate", status=status)
        - metrics_before.value(HTTP, route="/api/allocate", status=status)
        for status in ("200", "401", "403")
    }
    assert answered == {"200": 1, "401": 1, "403": 2}


async def test_wrong_content_types_and_oversize_bodies_are_refused_before_the_body_is_read(stack):
    device, code = await stack.enrolled()
    await stack.activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
    proper = runtime_context(device.device_id, f"CN={device.device_id}", sha256_of(device), stack)
    body = json.dumps(proper).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/jsonx", None):
        status, answer = await stack.post(body, content_type=content_type)
        assert status == 415, answer
    padded = {**proper, "deviceRuntimeContext": {**proper["deviceRuntimeContext"], "payload": "x" * 70_000}}
    status, _ = await stack.post(padded)
    assert status == 413
    refusals = stack.audit("")[-5:]
    assert [detail.split(": ")[1].split(",")[0] for _, detail in refusals] == [
        "content type 'text/plain'",
        "content type 'application/x-www-form-urlencoded'",
        "content type 'application/jsonx'",
        "content type 'application/octet-stream'",  # none given: HTTP's default
        "body over 65536 bytes",
    ]
    assert (await stack.activation_app.dps.get(device.device_id)).registration_state is None  # unread
    # what DPS sends: JSON with its charset
    assert (await stack.post(body, content_type="application/json; charset=utf-8"))[0] == 200


async def test_a_registry_that_cannot_be_read_answers_503_and_the_registration_fails(stack):
    device, code = await stack.enrolled()
    await stack.activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
    registry_file = stack.activation_dir / "registry.sqlite3"
    with sqlite3.connect(registry_file) as db:  # an operator's mistake: the table is gone
        db.execute("ALTER TABLE registry RENAME TO registry_away")
    try:
        status, _ = await stack.post(
            runtime_context(device.device_id, f"CN={device.device_id}", sha256_of(device), stack)
        )
        assert status == 503
        await refused(stack, device)  # DPS fails it: no hub at all, never a wrong one
        assert stack.audit(device.device_id)[-1] == ("error", "REGISTRY_UNAVAILABLE")
    finally:
        with sqlite3.connect(registry_file) as db:
            db.execute("ALTER TABLE registry_away RENAME TO registry")
    await on_no_hub(stack, device.device_id)
    result = await register(stack.emulator, device)  # readable again: it comes online
    assert result.status == "assigned"


async def test_a_flood_of_wrong_keys_is_one_row_and_a_count_a_device_refused_after_the_key_is_a_row_each(
    tmp_path, group_emulator, tls
):
    """Wrong function keys, which anyone who reaches the port can send: the first written, the rest counted
    (``provkit.refusal_audit``) and summarised when the service stops; the refusals a key holder causes for
    a device stay one row each (the audit needs them per device)."""
    own = Stack(tmp_path, group_emulator, tls)
    env = {**own.activation_env(), "ACTIVATION_METRICS_LISTEN": "127.0.0.1:0"}
    async with running_activation({**env, "ACTIVATION_REFUSAL_AUDIT_WINDOW_SECONDS": "600"}, tls) as (app, _):
        unknown = str(uuid.uuid4())
        body = runtime_context(unknown, f"CN={unknown}", "AB" * 32, own)
        statuses = []
        for start in range(0, 500, 50):
            batch = (own.post(body, key=f"wrong-key-{start + n}") for n in range(50))
            statuses += await asyncio.gather(*batch)
        assert {status for status, _ in statuses} == {401}
        for _ in range(3):
            assert (await own.post(body))[0] == 403
        assert own.audit(unknown) == [("refused", "DEVICE_UNKNOWN")] * 3  # one row each
        assert own.audit("") == [("refused", "FUNCTION_KEY_WRONG")]  # the first wrong key, so far
        metrics = await scrape(app.observe.metrics_url)
        assert metrics.value(HTTP, route="/api/allocate", status="401") == 500  # every one counted
        assert metrics.value(HTTP, route="/api/allocate", status="403") == 3
    # stopped gracefully: the open window's count is written
    (first, summary) = own.audit("")
    assert first == ("refused", "FUNCTION_KEY_WRONG")
    assert summary[0] == "refused"
    assert summary[1].startswith("FUNCTION_KEY_WRONG and 499 more like this between ")
    with sqlite3.connect(own.activation_dir / "audit.sqlite3") as db:
        callers = db.execute("SELECT DISTINCT caller FROM audit WHERE device_id = '' AND action = 'allocate'")
        assert callers.fetchall() == [("dps-allocation-webhook from 127.0.0.1",)]
