"""Activation codes survive lost answers: retained encrypted until acknowledged, rotated when lost."""

from __future__ import annotations

import os
import sqlite3
import stat
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from provisioning_env import dps_enrollment, factory_env, failure, mint, running_factory
from support.cli_process import run_module
from support.parties import FACTORY_URI

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.enrollment.codes_file import read_codes
from factory_svc.enrollment.outbox import MIGRATIONS, OPTIONS, Outbox
from factory_svc.enrollment.retained import KEY_FILE, RetainedCodes
from litestore import Schema, connect, user_version
from provkit.activation_code import verify_code


def new_id() -> str:
    return str(uuid.uuid4())


def _record(enrollment: dict) -> dict:
    return enrollment["optionalDeviceInformation"]["activationCode"]


@pytest.mark.slow
async def test_a_retry_after_a_restart_returns_the_code_and_the_files_keep_it_encrypted(
    tmp_path, module_emulator
):
    env = factory_env(tmp_path, module_emulator)
    async with running_factory(env) as (_app, stub):
        device = await mint(stub, new_id(), tmp_path)
        first = await stub.Enroll(
            pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem, request_id="r-1")
        )
    data = tmp_path / "factory"
    assert stat.S_IMODE((data / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "enrollments.sqlite3").stat().st_mode) == 0o600
    canonical = first.activation_code.replace("-", "").encode()
    for path in data.iterdir():
        if path.is_file():
            assert (
                canonical not in path.read_bytes() and first.activation_code.encode() not in path.read_bytes()
            )

    async with running_factory(env) as (app, stub):
        replay = await stub.Enroll(
            pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem, request_id="r-1")
        )
        assert replay.replayed and replay.activation_code == first.activation_code
        rerun = await stub.Enroll(
            pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
        )
        assert rerun.outcome == pb.ENROLL_OUTCOME_UNCHANGED and rerun.activation_code == first.activation_code

        with sqlite3.connect(data / "enrollments.sqlite3") as db:
            (sealed,) = db.execute(
                "SELECT ciphertext FROM retained_codes WHERE device_id = ?", (device.device_id,)
            ).fetchone()
        ack = await stub.AcknowledgeActivationCodes(
            pb.AcknowledgeActivationCodesRequest(device_ids=[device.device_id.upper()], request_id="a-1")
        )
        assert ack.acknowledged_count == 1 and not ack.replayed
        (acknowledged,) = [
            a for a in await app.enrollment.outbox.audit(device.device_id) if a.action == "acknowledge-code"
        ]
        assert acknowledged.request_id == "a-1" and acknowledged.caller.startswith(FACTORY_URI + " ")
        again = await stub.AcknowledgeActivationCodes(
            pb.AcknowledgeActivationCodesRequest(device_ids=[device.device_id.upper()], request_id="a-1")
        )
        assert again.replayed and again.acknowledged_count == 1
        for path in data.iterdir():  # not even the ciphertext is left behind (free pages, the log)
            if path.is_file():
                assert bytes(sealed) not in path.read_bytes(), path.name
        after = await stub.Enroll(
            pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem, request_id="r-1")
        )
        assert after.replayed and after.activation_code == ""  # only the hash remains
        empty = await failure(stub.AcknowledgeActivationCodes(pb.AcknowledgeActivationCodesRequest()))
        assert (empty.code, empty.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DEVICE_IDS_EMPTY")
        typo = await failure(
            stub.AcknowledgeActivationCodes(
                pb.AcknowledgeActivationCodesRequest(device_ids=[device.device_id, "not-a-guid"])
            )
        )
        assert (typo.code, typo.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DEVICE_ID_NOT_A_GUID")
    assert verify_code(
        first.activation_code, _record(await dps_enrollment(module_emulator, device.device_id))
    )


async def test_rotation_replaces_the_hash_keeps_the_rest_kills_the_old_code_and_is_audited(
    tmp_path, module_emulator
):
    async with running_factory(factory_env(tmp_path, module_emulator)) as (app, stub):
        device = await mint(stub, new_id(), tmp_path)
        first = await stub.Enroll(
            pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
        )
        before = await dps_enrollment(module_emulator, device.device_id)

        rotated = await stub.RotateActivationCode(
            pb.RotateActivationCodeRequest(device_id=device.device_id, request_id="rot-1")
        )
        assert rotated.activation_code and rotated.activation_code != first.activation_code
        after = await dps_enrollment(module_emulator, device.device_id)
        assert verify_code(rotated.activation_code, _record(after))
        assert not verify_code(first.activation_code, _record(after))
        assert after["etag"] != before["etag"]
        unchanged = ("attestation", "provisioningStatus", "initialTwin", "deviceId", "allocationPolicy")
        assert {k: after.get(k) for k in unchanged} == {k: before.get(k) for k in unchanged}

        replay = await stub.RotateActivationCode(
            pb.RotateActivationCodeRequest(device_id=device.device_id, request_id="rot-1")
        )
        assert replay.replayed and replay.activation_code == rotated.activation_code
        rerun = await stub.Enroll(
            pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
        )
        assert rerun.activation_code == rotated.activation_code  # the old one is no longer retained

        trail = [a for a in await app.enrollment.outbox.audit(device.device_id) if a.action == "rotate-code"]
        assert len(trail) == 1 and trail[0].caller.startswith(FACTORY_URI + " ")
        assert (trail[0].request_id, trail[0].detail) == ("rot-1", f"code id {_record(after)['salt']}")

        missing = await failure(stub.RotateActivationCode(pb.RotateActivationCodeRequest(device_id=new_id())))
        assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "ENROLLMENT_NOT_FOUND")


async def test_the_store_purges_by_age_and_refuses_a_ciphertext_moved_to_another_device(tmp_path):
    outbox = await Outbox.open(tmp_path / "enrollments.sqlite3")
    codes = await RetainedCodes.on(outbox.database, tmp_path / KEY_FILE)
    try:
        then = datetime(2026, 1, 1, tzinfo=UTC)
        record_a, record_b = {"salt": "c2FsdC1h"}, {"salt": "c2FsdC1i"}
        await codes.retain([("dev-a", "AAAA-BBBB-CCCC-DDDD", record_a)], then)
        await codes.retain([("dev-b", "EEEE-FFFF-GGGG-HHHH", record_b)], then + timedelta(days=8))
        assert await codes.find("dev-a", "c2FsdC1h") == "AAAA-BBBB-CCCC-DDDD"

        def swap(db):
            db.execute("UPDATE retained_codes SET device_id = 'dev-x' WHERE device_id = 'dev-a'")

        await outbox.database.store.run(swap)
        assert await codes.find("dev-x", "c2FsdC1h") is None  # bound to its device by the AEAD
        assert await codes.purge(then + timedelta(days=7)) == 1
        assert await codes.count() == 1 and await codes.find("dev-b", "c2FsdC1i") == "EEEE-FFFF-GGGG-HHHH"
    finally:
        await outbox.close()


async def test_an_enrollment_file_of_version_1_gains_the_retained_codes_by_migration(tmp_path):
    path = tmp_path / "enrollments.sqlite3"
    old = connect(path, Schema("enrollment outbox", MIGRATIONS[:1]), OPTIONS)
    old.execute("INSERT INTO enroll_requests (request_id, fingerprint, response) VALUES ('r-0', 'f', '{}')")
    old.close()
    outbox = await Outbox.open(path)
    try:
        codes = await RetainedCodes.on(outbox.database, tmp_path / KEY_FILE)
        assert await outbox.database.store.run(user_version) == len(MIGRATIONS) == 4  # and reservations
        assert await outbox.find_request("r-0") == ("f", {})  # kept
        await codes.retain([("dev-a", "AAAA-BBBB-CCCC-DDDD", {"salt": "s"})], datetime.now(UTC))
        assert await codes.find("dev-a", "s") == "AAAA-BBBB-CCCC-DDDD"
    finally:
        await outbox.close()


@pytest.mark.slow
async def test_rotate_code_command_prints_or_appends_the_new_code(tmp_path, module_emulator):
    async with running_factory(factory_env(tmp_path, module_emulator)) as (app, stub):
        env = {**os.environ, "FACTORY_CLIENT_INSECURE": "true", "FACTORY_CLIENT_TARGET": app.grpc_address}
        device = await mint(stub, new_id(), tmp_path)
        await stub.Enroll(pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem))

        status, out, err = await run_module("factory_svc.cli", "rotate-code", device.device_id, env=env)
        assert status == 0, err
        printed = out.split("code", 1)[1].split()[0]
        codes = tmp_path / "codes.csv"
        status, out, err = await run_module(
            "factory_svc.cli", "rotate-code", device.device_id, "--codes-out", str(codes), env=env
        )
        assert status == 0, err
        written = read_codes(codes)[device.device_id]
        assert stat.S_IMODE(codes.stat().st_mode) == 0o600 and written not in out
        record = _record(await dps_enrollment(module_emulator, device.device_id))
        assert verify_code(written, record) and not verify_code(printed, record)
        assert await app.enrollment.codes.count() == 0  # the appended code was acknowledged

        status, _out, err = await run_module("factory_svc.cli", "rotate-code", new_id(), env=env)
        assert status == 1 and "ENROLLMENT_NOT_FOUND" in err
