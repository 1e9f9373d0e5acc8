"""kill -9 of a real factory_svc process in the middle of a revocation: right after the ledger write, before
DPS and the hub were touched (DEVPROV_CRASH_AT=revoke.after_ledger), and right after the DPS enrollment was
disabled, before the hub (revoke.after_dps_write).  The restarted process carries the recorded intent out
at start-up, so the device can neither register nor connect (Microsoft's device SDK) and the OEM cannot
activate it again."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid

import grpc
import pytest
from provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    assert_locked_out,
    connect_to_hub,
    dps_enrollment,
    factory_env,
    failure,
    mint,
    register,
    registry,
    running_activation,
)
from support.factory_process import FactoryProcess
from support.waiting import until

from devprov.v1 import factory_service_pb2 as fpb

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240), pytest.mark.slow]
META = {"tags": {"line": 3}, "properties": {"desired": {"interval_s": 5}}}


@pytest.mark.parametrize(
    ("crash_at", "left_in_dps"), [("revoke.after_ledger", "enabled"), ("revoke.after_dps_write", "disabled")]
)
async def test_a_revocation_killed_midway_is_finished_at_start_up(tmp_path, emulator, crash_at, left_in_dps):
    tls = OemTls.create(tmp_path / "oem-tls")
    factory = FactoryProcess(factory_env(tmp_path, emulator), tmp_path / "factory.log")
    try:
        await factory.start(crash_at=crash_at)
        async with running_activation(activation_env(tmp_path, emulator, tls), tls) as (_app, activation):
            async with factory.stub() as stub:
                device = await mint(stub, str(uuid.uuid4()), tmp_path / "devices")
                enrolled = await stub.Enroll(
                    fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
                )
                code = enrolled.activation_code
                await activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
                hub = (await register(emulator, device)).registration_state.assigned_hub
                await connect_to_hub(emulator, device, hub)

                killed = await failure(
                    stub.RevokeCertificate(
                        fpb.RevokeCertificateRequest(
                            device_id=device.device_id, reason=fpb.REVOCATION_REASON_KEY_COMPROMISE
                        ),
                        timeout=60,
                    )
                )
                assert killed.code == grpc.StatusCode.UNAVAILABLE
            assert await factory.killed() == -signal.SIGKILL
            # what the crash left: the enrollment as the step reached it, the hub identity still connecting
            assert (await dps_enrollment(emulator, device.device_id))["provisioningStatus"] == left_in_dps
            await connect_to_hub(emulator, device, hub)

            await factory.start()  # no crash point: the open intent is carried out at start-up

            async def disabled() -> bool:
                enrollment = await dps_enrollment(emulator, device.device_id)
                return enrollment is not None and enrollment["provisioningStatus"] == "disabled"

            await until(disabled, "the DPS enrollment disabled after the restart", timeout=60)

            async def hub_disabled() -> bool:
                found = await asyncio.to_thread(registry(emulator, hub).get_device, device.device_id)
                return found.status == "disabled"

            await until(hub_disabled, "the hub identity disabled after the restart", timeout=60)
            await assert_locked_out(emulator, device, hub, activation, code, json.dumps(META))

            async with factory.stub() as stub:
                status = await stub.GetEnrollmentStatus(
                    fpb.GetEnrollmentStatusRequest(device_id=device.device_id)
                )
                assert status.state == fpb.ENROLLMENT_STATE_REVOKED
                listed = await stub.ListCertificates(fpb.ListCertificatesRequest(device_id=device.device_id))
                assert [c.revoked for c in listed.certificates] == [True]
                again = await stub.RevokeCertificate(fpb.RevokeCertificateRequest(device_id=device.device_id))
                assert again.newly_revoked_count == 0  # revoked once, by the killed call
                assert not again.enrollment_disabled and not again.hub_identity_disabled  # done already
    finally:
        await factory.stop()
