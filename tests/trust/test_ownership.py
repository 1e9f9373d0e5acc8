"""Who owns a device, over real mTLS against real factory_svc / activation_svc servers and the emulator:
the factory names the buyer (at enrollment or by a transfer before activation), or the first activation
claims the device; then only its owner's parties get an answer, and everyone else gets exactly what an
unknown device gets.  Re-enrollment of an activated device needs a reason, keeps the owner, kills the old
code and leaves a trail."""

from __future__ import annotations

import uuid

import grpc
import pytest
from enrollment.provisioning_env import dps_enrollment, failure, mint
from trust.test_parties import META, Trust, _enrolled
from trust.test_parties import trust as trust  # the same stack of real servers

from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import factory_service_pb2 as fpb
from provkit.grpc_errors import RpcErrorDetails


def _activate(device_id: str, code: str) -> apb.ActivateRequest:
    return apb.ActivateRequest(device_id=device_id, activation_code=code, metadata_json=META)


def _answer(details: RpcErrorDetails) -> tuple:
    """Everything a caller sees of a refusal, but the request id the server adds to every error."""
    metadata = {k: v for k, v in details.metadata.items() if k != "request_id"}
    return details.code, details.reason, details.domain, details.message, metadata, details.retry_after


async def _three_calls(stub, device_id: str, code: str) -> list[tuple]:
    return [
        _answer(await failure(stub.Activate(_activate(device_id, code)))),
        _answer(
            await failure(stub.Deactivate(apb.DeactivateRequest(device_id=device_id, activation_code=code)))
        ),
        _answer(
            await failure(
                stub.GetDeviceStatus(apb.GetDeviceStatusRequest(device_id=device_id, activation_code=code))
            )
        ),
    ]


async def test_a_named_owner_alone_activates_and_another_oem_sees_an_unknown_device(trust: Trust) -> None:
    async with (
        trust.stubs("factory") as (bench, _),
        trust.stubs("oem") as (_f1, acme),
        trust.stubs("portal") as (_f2, acme_portal),
        trust.stubs("oem-globex") as (_f3, globex),
    ):
        device = await mint(bench, str(uuid.uuid4()), trust.folder / "devices")
        enrolled = await bench.Enroll(
            fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem, owner_oem="acme")
        )
        code = enrolled.activation_code
        status = await bench.GetEnrollmentStatus(fpb.GetEnrollmentStatusRequest(device_id=device.device_id))
        assert status.owner_oem == "acme"
        before = await dps_enrollment(trust.emulator, device.device_id)
        assert before is not None and before["optionalDeviceInformation"]["owner"] == {"oem": "acme"}

        not_theirs = await _three_calls(globex, device.device_id, code)
        unknown = await _three_calls(globex, str(uuid.uuid4()), code)
        assert not_theirs == unknown
        assert not_theirs[0][:2] == (grpc.StatusCode.PERMISSION_DENIED, "ACTIVATION_DENIED")
        after = await dps_enrollment(trust.emulator, device.device_id)
        assert after is not None and after["etag"] == before["etag"]

        reply = await acme_portal.Activate(_activate(device.device_id, code))  # a portal acting for acme
        assert reply.lifecycle == apb.LIFECYCLE_ACTIVATED and reply.owner_oem == "acme"
        mine = await acme.GetDeviceStatus(
            apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
        )
        assert mine.owner_oem == "acme" and mine.enrollment_etag == reply.enrollment_etag
    audit = await trust.activation_app.audit.entries(device.device_id)
    assert [(e.action, e.outcome) for e in audit] == [
        ("activate", "denied"),
        ("deactivate", "denied"),
        ("status", "denied"),
        ("activate", "ok"),
    ]
    assert audit[0].caller.startswith("urn:devprov:oem:globex ")


async def test_the_first_activation_claims_the_device_and_probing_it_counts_like_an_unknown_id(
    trust: Trust,
) -> None:
    allowed = trust.activation_app.settings.max_failures
    async with (
        trust.stubs("factory") as (bench, _),
        trust.stubs("oem") as (_f1, acme),
        trust.stubs("oem-globex") as (_f2, globex),
        trust.stubs("oem-mallory") as (_f3, mallory),
    ):
        device, code = await _enrolled(bench, trust.folder)
        assert (
            await bench.GetEnrollmentStatus(fpb.GetEnrollmentStatusRequest(device_id=device.device_id))
        ).owner_oem == ""
        reply = await acme.Activate(_activate(device.device_id, code))
        assert reply.owner_oem == "acme"
        enrollment = await dps_enrollment(trust.emulator, device.device_id)
        assert enrollment is not None and enrollment["optionalDeviceInformation"]["owner"] == {"oem": "acme"}
        status = await bench.GetEnrollmentStatus(fpb.GetEnrollmentStatusRequest(device_id=device.device_id))
        assert status.owner_oem == "acme"

        # globex holds the right code of acme's device; mallory guesses at an id that does not exist
        owned = [
            _answer(await failure(globex.Activate(_activate(device.device_id, code))))
            for _ in range(allowed + 1)
        ]
        unknown_id = str(uuid.uuid4())
        unknown = [
            _answer(await failure(mallory.Activate(_activate(unknown_id, code)))) for _ in range(allowed + 1)
        ]
        assert [a[:2] for a in owned] == [
            (grpc.StatusCode.PERMISSION_DENIED, "ACTIVATION_DENIED")
        ] * allowed + [(grpc.StatusCode.RESOURCE_EXHAUSTED, "ACTIVATION_RATE_LIMITED")]
        assert [a[:5] for a in owned] == [a[:5] for a in unknown]
        assert (await dps_enrollment(trust.emulator, device.device_id))["etag"] == enrollment["etag"]
        again = await acme.GetDeviceStatus(
            apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
        )
        assert again.lifecycle == apb.LIFECYCLE_ACTIVATED and again.owner_oem == "acme"


async def test_the_factory_transfers_a_device_before_activation_and_not_after(trust: Trust) -> None:
    async with (
        trust.stubs("factory") as (bench, _),
        trust.stubs("oem") as (_f1, acme),
        trust.stubs("oem-globex") as (_f2, globex),
    ):
        device = await mint(bench, str(uuid.uuid4()), trust.folder / "devices")
        code = (
            await bench.Enroll(
                fpb.EnrollRequest(
                    device_id=device.device_id, certificate_pem=device.chain_pem, owner_oem="acme"
                )
            )
        ).activation_code
        move = fpb.TransferOwnershipRequest(
            device_id=device.device_id,
            owner_oem="globex",
            reason="order 77 resold to globex",
            request_id="t-1",
        )
        moved = await bench.TransferOwnership(move)
        assert (moved.owner_oem, moved.previous_owner_oem, moved.changed) == ("globex", "acme", True)
        assert (await bench.TransferOwnership(move)).replayed

        denied = await failure(acme.Activate(_activate(device.device_id, code)))
        assert denied.reason == "ACTIVATION_DENIED"
        assert (await globex.Activate(_activate(device.device_id, code))).owner_oem == "globex"

        back = fpb.TransferOwnershipRequest(device_id=device.device_id, owner_oem="acme", reason="undo")
        refused = await failure(bench.TransferOwnership(back))
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "DEVICE_ALREADY_ACTIVATED",
        )
        bad = await failure(
            bench.TransferOwnership(
                fpb.TransferOwnershipRequest(device_id=device.device_id, owner_oem="Not An Id")
            )
        )
        assert (bad.code, bad.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "OWNER_INVALID")
        enrollment = await dps_enrollment(trust.emulator, device.device_id)
        assert enrollment is not None and enrollment["optionalDeviceInformation"]["owner"] == {
            "oem": "globex"
        }
        named = await failure(
            bench.Enroll(
                fpb.EnrollRequest(
                    device_id=device.device_id, certificate_pem=device.chain_pem, owner_oem="acme"
                )
            )
        )
        assert (named.code, named.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "OWNER_CHANGE_NEEDS_TRANSFER",
        )
    audit = await trust.factory_app.enrollment.outbox.audit(device.device_id)
    assert [(a.action, a.request_id) for a in audit] == [("transfer", "t-1")]
    assert audit[0].caller.startswith("urn:devprov:factory:plant-1 ")
    assert "acme->globex" in audit[0].detail and "order 77 resold to globex" in audit[0].detail


@pytest.mark.slow
async def test_reenrolling_an_activated_device_needs_a_reason_keeps_the_owner_and_kills_the_old_code(
    trust: Trust,
) -> None:
    async with trust.stubs("factory") as (bench, _), trust.stubs("oem") as (_f, acme):
        device, old_code = await _enrolled(bench, trust.folder)
        await acme.Activate(_activate(device.device_id, old_code))
        before = await dps_enrollment(trust.emulator, device.device_id)
        rework = await mint(bench, device.device_id, trust.folder / "rework")
        again = fpb.EnrollRequest(device_id=device.device_id, certificate_pem=rework.chain_pem, replace=True)
        refused = await failure(bench.Enroll(again))
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "REPLACE_REASON_REQUIRED",
        )
        assert refused.metadata["stage"] == "activated"
        assert (await dps_enrollment(trust.emulator, device.device_id))["etag"] == before["etag"]

        again.replace_reason = "RMA 4711: main board swapped"
        again.request_id = "rework-1"
        reply = await bench.Enroll(again)
        assert reply.outcome == fpb.ENROLL_OUTCOME_REPLACED and reply.activation_code
        after = await dps_enrollment(trust.emulator, device.device_id)
        assert after["optionalDeviceInformation"]["owner"] == {"oem": "acme"}
        stale = await failure(
            acme.GetDeviceStatus(
                apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=old_code)
            )
        )
        assert stale.reason == "ACTIVATION_DENIED"
        status = await acme.GetDeviceStatus(
            apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=reply.activation_code)
        )
        assert status.owner_oem == "acme"
    audit = await trust.factory_app.enrollment.outbox.audit(device.device_id)
    assert [(a.action, a.request_id) for a in audit] == [("replace", "rework-1")]
    assert audit[0].caller.startswith("urn:devprov:factory:plant-1 ")
    assert "stage=activated" in audit[0].detail and "owner=acme" in audit[0].detail
    assert "reason=RMA 4711: main board swapped" in audit[0].detail


@pytest.mark.slow
async def test_a_batch_names_each_devices_owner_and_a_malformed_one_fails_only_its_item(trust: Trust) -> None:
    owners = ["acme", "globex", "", "Not An Id"]
    async with trust.stubs("factory") as (bench, _):
        devices = [await mint(bench, str(uuid.uuid4()), trust.folder / "batch") for _ in owners]
        items = [
            fpb.EnrollBatchItem(device_id=d.device_id, certificate_pem=d.chain_pem, owner_oem=owner)
            for d, owner in zip(devices, owners, strict=True)
        ]
        reply = await bench.EnrollBatch(fpb.EnrollBatchRequest(items=items))
        assert (reply.enrolled_count, reply.failed_count) == (3, 1)
        assert reply.results[3].error.reason == "OWNER_INVALID"
        for device, owner in zip(devices[:3], owners[:3], strict=True):
            status = await bench.GetEnrollmentStatus(
                fpb.GetEnrollmentStatusRequest(device_id=device.device_id)
            )
            assert status.owner_oem == owner
        assert await dps_enrollment(trust.emulator, devices[3].device_id) is None
