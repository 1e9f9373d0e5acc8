"""Enroll / EnrollBatch / GetEnrollmentStatus through the factory's gRPC service into a real emulator."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
from provisioning_env import dps_enrollment, factory_env, failure, mint, running_factory
from support.parties import FACTORY_URI

from devprov.v1 import factory_service_pb2 as pb
from provkit.activation_code import verify_code


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
async def factory(tmp_path, module_emulator):
    async with running_factory(factory_env(tmp_path, module_emulator)) as (app, stub):
        yield module_emulator, stub, app


async def test_enroll_creates_a_disabled_enrollment_holding_only_the_code_hash(factory, tmp_path):
    emulator, stub, _app = factory
    device = await mint(stub, new_id(), tmp_path)
    reply = await stub.Enroll(
        pb.EnrollRequest(device_id=device.device_id.upper(), certificate_pem=device.chain_pem)
    )
    assert reply.outcome == pb.ENROLL_OUTCOME_CREATED and reply.delivery == pb.ENROLLMENT_DELIVERY_LIVE
    assert reply.device_id == device.device_id and reply.sha1_thumbprint == device.sha1
    enrollment = await dps_enrollment(emulator, device.device_id)
    assert enrollment["provisioningStatus"] == "disabled"
    assert enrollment["registrationId"] == enrollment["deviceId"] == device.device_id
    assert enrollment["attestation"]["type"] == "x509"
    record = enrollment["optionalDeviceInformation"]["activationCode"]
    assert reply.activation_code.replace("-", "") not in json.dumps(enrollment)
    assert verify_code(reply.activation_code, record)

    status = await stub.GetEnrollmentStatus(pb.GetEnrollmentStatusRequest(device_id=device.device_id))
    assert status.state == pb.ENROLLMENT_STATE_LIVE and status.provisioning_status == "disabled"
    missing = await stub.GetEnrollmentStatus(pb.GetEnrollmentStatusRequest(device_id=new_id()))
    assert missing.state == pb.ENROLLMENT_STATE_NOT_FOUND


async def test_idempotent_replays_conflicts_and_replace(factory, tmp_path):
    emulator, stub, _app = factory
    device = await mint(stub, new_id(), tmp_path / "a")
    first = await stub.Enroll(
        pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem, request_id="e-1")
    )
    before = await dps_enrollment(emulator, device.device_id)

    again = await stub.Enroll(pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem))
    # the label is not acknowledged yet: the retained code comes again (a lost answer costs nothing)
    assert again.outcome == pb.ENROLL_OUTCOME_UNCHANGED and again.activation_code == first.activation_code
    replay = await stub.Enroll(
        pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem, request_id="e-1")
    )
    assert replay.replayed and replay.outcome == pb.ENROLL_OUTCOME_CREATED
    assert replay.activation_code == first.activation_code
    assert (await dps_enrollment(emulator, device.device_id))["etag"] == before["etag"]

    rework = await mint(stub, device.device_id, tmp_path / "b")  # a second certificate for the same id
    conflict = await failure(
        stub.Enroll(pb.EnrollRequest(device_id=device.device_id, certificate_pem=rework.chain_pem))
    )
    assert conflict.code is grpc.StatusCode.ALREADY_EXISTS and conflict.reason == "ENROLLMENT_EXISTS"
    reused = await failure(
        stub.Enroll(
            pb.EnrollRequest(device_id=device.device_id, certificate_pem=rework.chain_pem, request_id="e-1")
        )
    )
    assert (reused.code, reused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    malformed = await failure(
        stub.Enroll(
            pb.EnrollRequest(device_id=device.device_id, certificate_pem=rework.chain_pem, request_id="a b")
        )
    )
    assert (malformed.code, malformed.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_INVALID")
    assert (await dps_enrollment(emulator, device.device_id))["etag"] == before["etag"]

    replaced = await stub.Enroll(
        pb.EnrollRequest(device_id=device.device_id, certificate_pem=rework.chain_pem, replace=True)
    )
    assert (
        replaced.outcome == pb.ENROLL_OUTCOME_REPLACED and replaced.activation_code != first.activation_code
    )
    after = await dps_enrollment(emulator, device.device_id)
    assert (
        after["attestation"]["x509"]["clientCertificates"]["primary"]["info"]["sha1Thumbprint"] == rework.sha1
    )
    assert after["provisioningStatus"] == "disabled"
    record = after["optionalDeviceInformation"]["activationCode"]
    assert verify_code(replaced.activation_code, record) and not verify_code(first.activation_code, record)


async def test_bad_certificates_are_refused_before_any_dps_call(factory, tmp_path):
    emulator, stub, _app = factory
    device = await mint(stub, new_id(), tmp_path)
    other_id = new_id()
    mismatch = await failure(
        stub.Enroll(pb.EnrollRequest(device_id=other_id, certificate_pem=device.chain_pem))
    )
    assert (
        mismatch.code is grpc.StatusCode.INVALID_ARGUMENT
        and mismatch.reason == "CERTIFICATE_SUBJECT_MISMATCH"
    )
    assert mismatch.field_violations[0].field == "certificate_pem"
    garbage = await failure(stub.Enroll(pb.EnrollRequest(device_id=other_id, certificate_pem="not a pem")))
    assert garbage.reason == "CERTIFICATE_MALFORMED"
    bad_id = await failure(
        stub.Enroll(pb.EnrollRequest(device_id="bad/id", certificate_pem=device.chain_pem))
    )
    assert bad_id.reason == "DEVICE_ID_NOT_A_GUID"
    assert [v.field for v in bad_id.field_violations] == ["device_id"]
    assert await dps_enrollment(emulator, other_id) is None
    assert await dps_enrollment(emulator, device.device_id) is None


async def test_batch_has_per_device_results_and_one_bad_device_fails_no_other(factory, tmp_path):
    emulator, stub, _app = factory
    devices = [await mint(stub, new_id(), tmp_path) for _ in range(23)]
    await stub.Enroll(pb.EnrollRequest(device_id=devices[0].device_id, certificate_pem=devices[0].chain_pem))
    items = [pb.EnrollBatchItem(device_id=d.device_id, certificate_pem=d.chain_pem) for d in devices]
    items.insert(
        5, pb.EnrollBatchItem(device_id=new_id(), certificate_pem=devices[1].chain_pem)
    )  # CN mismatch
    items.append(pb.EnrollBatchItem(device_id=devices[2].device_id, certificate_pem=devices[2].chain_pem))
    reply = await stub.EnrollBatch(pb.EnrollBatchRequest(items=items, request_id="b-1"))
    assert [r.index for r in reply.results] == list(range(len(items)))
    errors = {r.index: r.error.reason for r in reply.results if r.HasField("error")}
    assert errors == {5: "CERTIFICATE_SUBJECT_MISMATCH", len(items) - 1: "DUPLICATE_IN_BATCH"}
    assert reply.failed_count == 2 and reply.enrolled_count == len(items) - 2 and reply.queued_count == 0
    outcomes = {r.device_id: r.response.outcome for r in reply.results if r.HasField("response")}
    assert outcomes[devices[0].device_id] == pb.ENROLL_OUTCOME_UNCHANGED
    for device in devices[1:]:
        assert outcomes[device.device_id] == pb.ENROLL_OUTCOME_CREATED
    codes = {r.device_id: r.response.activation_code for r in reply.results if r.HasField("response")}
    for device in devices[1:4]:
        enrollment = await dps_enrollment(emulator, device.device_id)
        assert enrollment["provisioningStatus"] == "disabled"
        assert verify_code(codes[device.device_id], enrollment["optionalDeviceInformation"]["activationCode"])
    replay = await stub.EnrollBatch(pb.EnrollBatchRequest(items=items, request_id="b-1"))
    assert replay.replayed and [r.device_id for r in replay.results] == [r.device_id for r in reply.results]
    replayed = {r.device_id: r.response.activation_code for r in replay.results if r.HasField("response")}
    assert replayed == codes
    empty = await failure(stub.EnrollBatch(pb.EnrollBatchRequest()))
    assert empty.reason == "BATCH_EMPTY"


async def test_without_any_cloud_configured_enroll_is_a_clear_precondition_failure(tmp_path, monkeypatch):
    from devprov.v1 import factory_service_pb2_grpc as pb_grpc
    from factory_svc.app import FactoryApp
    from factory_svc.settings import load_settings
    from provkit.channels import ChannelSecurity, create_channel

    monkeypatch.chdir(tmp_path)  # no .iot-emulator/connection.json here
    env = {
        "FACTORY_DATA_DIR": str(tmp_path / "f"),
        "FACTORY_SERVER_INSECURE": "true",
        "FACTORY_SERVER_INSECURE_IDENTITY": FACTORY_URI,
        "FACTORY_SERVER_PORT": "0",
    }
    app = await FactoryApp.open(load_settings(env=env))
    assert app.enrollment is None
    server = await app.start()
    try:
        async with create_channel(server.address, ChannelSecurity(insecure=True)) as channel:
            stub = pb_grpc.FactoryServiceStub(channel)
            device = await mint(stub, new_id(), tmp_path)
            refused = await failure(
                stub.Enroll(pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem))
            )
    finally:
        await server.stop(0)
        await app.close()
    assert (
        refused.code is grpc.StatusCode.FAILED_PRECONDITION and refused.reason == "ENROLLMENT_NOT_CONFIGURED"
    )
