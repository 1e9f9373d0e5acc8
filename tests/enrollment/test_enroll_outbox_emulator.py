"""The outbox against a real emulator that is down, then up: enrollments accepted while DPS is unreachable
arrive later, in order, exactly once -- also across a kill -9 of a real factory_svc process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace as dc_replace
from datetime import UTC, datetime

import pytest
from provisioning_env import (
    connection_file,
    dps_enrollment,
    factory_env,
    mint,
    running_factory,
    stopped_emulator,
)
from support.cli_process import wait_serving
from support.emulator import free_port
from support.waiting import until

from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from factory_svc.enrollment.delivery import Delivered, NotDelivered, OutboxDelivery
from factory_svc.enrollment.lint import LintedCertificate
from factory_svc.enrollment.outbox import EntryIntent, NewEntry, Outbox, OutboxMode
from factory_svc.enrollment.records import new_enrollment, new_enrollment_of
from provkit.activation_code import hash_code, new_code, verify_code
from provkit.channels import ChannelSecurity, create_channel
from provkit.cloud import ActivationRecord, load_cloud_settings
from provkit.dps import DpsEnrollments
from provkit.settings import SettingsSource


def new_id() -> str:
    return str(uuid.uuid4())


async def wait_state(
    stub, device_id: str, state: int, timeout: float = 30.0
) -> pb.GetEnrollmentStatusResponse:
    last: list[pb.GetEnrollmentStatusResponse] = []

    async def reached() -> pb.GetEnrollmentStatusResponse | None:
        last[:] = [await stub.GetEnrollmentStatus(pb.GetEnrollmentStatusRequest(device_id=device_id))]
        return last[0] if last[0].state == state else None

    def stayed() -> str:
        return f"{device_id} stayed {pb.EnrollmentState.Name(last[0].state)}" if last else device_id

    return await until(reached, stayed, timeout=timeout)


@contextlib.asynccontextmanager
async def dps_and_outbox(tmp_path, emulator) -> AsyncIterator[tuple[DpsEnrollments, Outbox]]:
    cloud = load_cloud_settings(
        SettingsSource("T", env={"T_CLOUD_EMULATOR_CONNECTION_FILE": str(connection_file(emulator))})
    )
    dps = await DpsEnrollments.open(cloud.dps)
    outbox = await Outbox.open(tmp_path / "enrollments.sqlite3")
    try:
        yield dps, outbox
    finally:
        await outbox.close()
        await dps.close()


@pytest.mark.slow
async def test_enrollments_queued_while_dps_is_down_arrive_exactly_once(tmp_path):
    emulator, env = stopped_emulator(tmp_path)
    try:
        async with running_factory(env) as (app, stub):
            devices = [await mint(stub, new_id(), tmp_path / "devices") for _ in range(3)]
            codes = {}
            for device in devices:
                reply = await stub.Enroll(
                    pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
                )
                assert (
                    reply.outcome == pb.ENROLL_OUTCOME_QUEUED
                    and reply.delivery == pb.ENROLLMENT_DELIVERY_QUEUED
                )
                codes[device.device_id] = reply.activation_code
            status = await stub.GetEnrollmentStatus(
                pb.GetEnrollmentStatusRequest(device_id=devices[0].device_id)
            )
            assert status.state == pb.ENROLLMENT_STATE_PENDING

            emulator.start()
            delivered = [await wait_state(stub, d.device_id, pb.ENROLLMENT_STATE_DELIVERED) for d in devices]
            assert [d.delivered_time.ToDatetime() for d in delivered] == sorted(
                d.delivered_time.ToDatetime() for d in delivered
            ), "delivered in the order accepted"
            for device in devices:
                enrollment = await dps_enrollment(emulator, device.device_id)
                assert enrollment["provisioningStatus"] == "disabled"
                assert verify_code(
                    codes[device.device_id], enrollment["optionalDeviceInformation"]["activationCode"]
                )
            entries = await app.enrollment.outbox.entries()
            assert [e.device_id for e in entries] == [d.device_id for d in devices]
            assert {e.outcome for e in entries} == {"created"}

            late = await mint(stub, new_id(), tmp_path / "devices")
            reply = await stub.Enroll(
                pb.EnrollRequest(device_id=late.device_id, certificate_pem=late.chain_pem)
            )
            assert reply.delivery == pb.ENROLLMENT_DELIVERY_LIVE
    finally:
        emulator.stop()


async def test_a_retried_delivery_recognises_its_own_earlier_write(tmp_path, module_emulator):
    """The crash window: DPS applied the write, the outbox never learnt it; the retry must not write again."""
    async with dps_and_outbox(tmp_path, module_emulator) as (dps, outbox):
        async with running_factory(factory_env(tmp_path, module_emulator)) as (_app, stub):
            device = await mint(stub, new_id(), tmp_path)
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        leaf = x509.load_pem_x509_certificates(device.chain_pem.encode())[0]
        linted = LintedCertificate(
            device.device_id,
            leaf,
            leaf.public_bytes(serialization.Encoding.PEM).decode(),
            device.sha1,
            leaf.fingerprint(hashes.SHA256()).hex().upper(),
            leaf.not_valid_after_utc,
        )
        code_hash = hash_code(new_code(), log2_n=8)
        (seq,) = await outbox.enqueue(
            [
                NewEntry(
                    device.device_id, OutboxMode.CREATE, linted.leaf_pem, code_hash, linted.sha256_thumbprint
                )
            ],
            datetime.now(UTC),
        )
        applied = await dps.create(
            new_enrollment(linted, code_hash)
        )  # the delivery that "crashed" after DPS applied it
        entry = await outbox.oldest_pending()
        assert entry is not None and entry.seq == seq
        delivery = OutboxDelivery(dps, outbox, lambda: datetime.now(UTC))
        assert await delivery.deliver(entry) is Delivered.ALREADY_APPLIED
        assert (await dps_enrollment(module_emulator, device.device_id))["etag"] == applied.etag

        other = NewEntry(
            device.device_id, OutboxMode.CREATE, linted.leaf_pem, hash_code(new_code(), log2_n=8), "0" * 64
        )
        await outbox.enqueue([other], datetime.now(UTC))
        entries = await outbox.entries()
        refused = await delivery.deliver(entries[-1])
        assert isinstance(refused, NotDelivered) and refused.reason == "ENROLLMENT_EXISTS"


async def _serve(env: dict[str, str], log_path) -> asyncio.subprocess.Process:
    log = log_path.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "factory_svc.cli", "serve", env=env, stdout=log, stderr=log
        )
    finally:
        log.close()


@pytest.mark.slow
async def test_kill_9_with_queued_enrollments_then_restart_loses_and_duplicates_nothing(tmp_path):
    emulator, factory_settings = stopped_emulator(tmp_path)
    port = free_port("127.0.0.1")
    target = f"127.0.0.1:{port}"
    env = {**os.environ, **factory_settings, "FACTORY_SERVER_PORT": str(port)}
    server = await _serve(env, tmp_path / "factory.log")
    try:
        await wait_serving(target, ChannelSecurity(insecure=True), "factory-svc serve")
        codes: dict[str, str] = {}
        async with create_channel(target, ChannelSecurity(insecure=True)) as channel:
            stub = pb_grpc.FactoryServiceStub(channel)
            devices = [await mint(stub, new_id(), tmp_path / "devices") for _ in range(5)]
            reply = await stub.EnrollBatch(
                pb.EnrollBatchRequest(
                    items=[
                        pb.EnrollBatchItem(device_id=d.device_id, certificate_pem=d.chain_pem)
                        for d in devices
                    ]
                )
            )
            assert reply.queued_count == 5
            codes = {r.device_id: r.response.activation_code for r in reply.results}
        server.send_signal(signal.SIGKILL)
        await server.wait()

        emulator.start()
        server = await _serve(env, tmp_path / "factory.log")
        await wait_serving(target, ChannelSecurity(insecure=True), "factory-svc serve")
        async with create_channel(target, ChannelSecurity(insecure=True)) as channel:
            stub = pb_grpc.FactoryServiceStub(channel)
            for device in devices:
                await wait_state(stub, device.device_id, pb.ENROLLMENT_STATE_DELIVERED)
        for device in devices:
            enrollment = await dps_enrollment(emulator, device.device_id)
            assert verify_code(
                codes[device.device_id], enrollment["optionalDeviceInformation"]["activationCode"]
            )
        with sqlite3.connect(tmp_path / "factory" / "enrollments.sqlite3") as db:
            rows = db.execute("SELECT device_id, state FROM outbox ORDER BY seq").fetchall()
        assert rows == [(d.device_id, "delivered") for d in devices]
    finally:
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
            await asyncio.wait_for(server.wait(), 30)
        emulator.stop()


async def test_a_queued_replace_of_an_activated_device_needs_its_reason_keeps_the_owner_and_is_audited(
    tmp_path, module_emulator
):
    """The rules of a live replace hold for one that waited in the outbox: they are checked against what
    DPS holds at delivery, with the reason and the caller the entry carries."""
    async with dps_and_outbox(tmp_path, module_emulator) as (dps, outbox):
        async with running_factory(factory_env(tmp_path, module_emulator)) as (_app, stub):
            device = await mint(stub, new_id(), tmp_path / "first")
            rework = await mint(stub, device.device_id, tmp_path / "rework")
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        old_code = new_code()
        created = await dps.create(
            new_enrollment_of(device.device_id, device.chain_pem, hash_code(old_code), "acme")
        )
        await dps.update(dc_replace(created, activation=ActivationRecord(activated_at=datetime.now(UTC))))
        leaf = x509.load_pem_x509_certificates(rework.chain_pem.encode())[0]
        sha256 = leaf.fingerprint(hashes.SHA256()).hex().upper()
        new = new_code()
        entries = [
            NewEntry(device.device_id, OutboxMode.REPLACE, rework.chain_pem, hash_code(new), sha256),
            NewEntry(
                device.device_id,
                OutboxMode.REPLACE,
                rework.chain_pem,
                hash_code(new),
                sha256,
                EntryIntent("", "board swapped", "urn:devprov:factory:plant-1 mes", "r-7"),
            ),
        ]
        await outbox.enqueue(entries, datetime.now(UTC))
        delivery = OutboxDelivery(dps, outbox, lambda: datetime.now(UTC))
        without, with_reason = await outbox.entries()
        refused = await delivery.deliver(without)
        assert isinstance(refused, NotDelivered) and refused.reason == "REPLACE_REASON_REQUIRED"
        assert await delivery.deliver(with_reason) is Delivered.REPLACED
        enrollment = await dps.get(device.device_id)
        assert enrollment is not None and enrollment.owner == "acme"
        assert verify_code(new, enrollment.code_hash) and not verify_code(old_code, enrollment.code_hash)
        (audit,) = await outbox.audit(device.device_id)
        assert (audit.action, audit.caller, audit.request_id) == (
            "replace",
            "urn:devprov:factory:plant-1 mes",
            "r-7",
        )
        assert "stage=activated" in audit.detail and "reason=board swapped" in audit.detail
