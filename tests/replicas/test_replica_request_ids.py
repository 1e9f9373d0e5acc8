"""One request id sent to two replicas (real ``serve`` processes on one PostgreSQL database): the request is
executed once, by the replica that reserved the id; the other waits and answers the same; another body is
REQUEST_ID_REUSED at once; a caller whose deadline comes first gets ABORTED REQUEST_IN_PROGRESS; and when the
holder is killed (SIGKILL, right after it reserved the id) a retry on the other replica takes the request
over once the lease ran out: exactly one certificate, one DPS write.  Enroll killed after its DPS write is
taken over the same way and recognises the write (its codes are retained before, its work idempotent).  A
CSR MintCertificate reserves nothing: the ledger's key on the request id decides which replica's certificate
is recorded, and every answer is that one."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from contextlib import AsyncExitStack

import grpc
import psycopg
import pytest
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    dps_enrollment,
    factory_env,
    failure,
    mint,
    running_factory,
)
from factory.factory_env import make_csr, make_key
from replicas.test_replicas import migrated
from support.factory_process import FactoryProcess

from dbstore import DatabaseUrl
from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import factory_service_pb2 as fpb

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240), pytest.mark.slow]

LEASE = "3"  # seconds: how long a dead holder keeps its request ids


async def reserved(postgres_url: str, table: str, request_id: str) -> None:
    """Wait until a replica holds ``request_id`` (its reservation row exists)."""
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        for _ in range(600):
            sql = f"SELECT 1 FROM {table} WHERE request_id = %s"
            cursor = await conn.execute(sql, (request_id,))
            if await cursor.fetchone():
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"no replica reserved {request_id}")


async def count(postgres_url: str, sql: str, *params: object) -> int:
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        row = await (await conn.execute(sql, params)).fetchone()
    assert row is not None
    return int(row[0])


def mint_request(device_id: str, request_id: str, key_type: int = fpb.KEY_TYPE_RSA_3072):
    return fpb.MintCertificateRequest(
        device_id=device_id,
        server_key_generation=fpb.ServerKeyGeneration(key_type=key_type),
        request_id=request_id,
    )


async def test_two_factory_replicas_mint_one_request_id_once(tmp_path, emulator, postgres_url):
    """Replica B is armed to die the moment it reserves a request id: it must never execute one A holds.
    Later B is the holder that dies, and A takes its request over after the lease."""
    await migrated(DatabaseUrl.parse(postgres_url))
    env = factory_env(
        tmp_path, emulator, FACTORY_DATABASE_URL=postgres_url, FACTORY_REQUESTS_LEASE_SECONDS=LEASE
    )  # one data directory: the replicas share the CA
    a, b = FactoryProcess(env, tmp_path / "a.log"), FactoryProcess(env, tmp_path / "b.log")
    try:
        await a.start()
        await b.start(crash_at="request.reserved")
        async with a.stub() as stub_a, b.stub() as stub_b:
            device = str(uuid.uuid4())
            request = mint_request(device, "mint-1")
            first = asyncio.ensure_future(stub_a.MintCertificate(request))  # RSA-3072: seconds of work
            await reserved(postgres_url, "mint_reservations", "mint-1")
            other_body = mint_request(device, "mint-1", fpb.KEY_TYPE_EC_P256)
            reused = await failure(stub_b.MintCertificate(other_body))
            assert (reused.code, reused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
            answers = await asyncio.gather(
                first, *(stub.MintCertificate(request) for stub in (stub_b, stub_a, stub_b))
            )
            assert b.process is not None and b.process.returncode is None  # B never executed it
            assert len({answer.certificate.serial_number for answer in answers}) == 1
            assert len({answer.certificate.certificate_chain_pem for answer in answers}) == 1
            assert [answer.replayed for answer in answers] == [False, True, True, True]
            assert answers[0].private_key_pem  # the key goes to the one caller that got the certificate made
            issued = "SELECT count(*) FROM certificates WHERE request_id = %s"
            assert await count(postgres_url, issued, "mint-1") == 1

            # B reserves a new id and is killed right there (nothing signed yet)
            doomed = mint_request(str(uuid.uuid4()), "mint-3", fpb.KEY_TYPE_EC_P256)
            killed = await failure(stub_b.MintCertificate(doomed))
            assert killed.code is grpc.StatusCode.UNAVAILABLE
            assert await b.killed() == -signal.SIGKILL
            # while its lease runs, a retry on A with a short deadline is told to come back, and runs nothing
            busy = await failure(stub_a.MintCertificate(doomed, timeout=1.0))
            assert (busy.code, busy.reason) == (grpc.StatusCode.ABORTED, "REQUEST_IN_PROGRESS")
            assert busy.retry_after and busy.metadata["request_id"] == "mint-3"
            assert await count(postgres_url, issued, "mint-3") == 0
            # a retry that waits: A takes the request over once B's lease has run out
            taken = await stub_a.MintCertificate(doomed, timeout=60)
            assert not taken.replayed and taken.certificate.serial_number
            again = await stub_a.MintCertificate(doomed)
            assert again.replayed and again.certificate.serial_number == taken.certificate.serial_number
            assert await count(postgres_url, issued, "mint-3") == 1
            assert await count(postgres_url, "SELECT count(*) FROM mint_reservations") == 0
    finally:
        await a.stop()
        await b.stop()


def _answer(reply: apb.ActivateResponse) -> tuple:
    return (
        reply.device_id,
        reply.hub,
        reply.path,
        reply.lifecycle,
        reply.enrollment_etag,
        reply.registered_hub,
        reply.owner_oem,
    )


async def test_a_csr_request_id_sent_to_two_replicas_at_once_records_one_certificate(
    tmp_path, emulator, postgres_url
):
    """CSR mode reserves nothing (the ledger's key on the request id decides, between replicas too): the same
    request sent to both replicas at once, four times each, records one certificate, and every answer is that
    certificate (the losers' signatures are dropped, never recorded nor answered); another body with the
    id is REQUEST_ID_REUSED."""
    await migrated(DatabaseUrl.parse(postgres_url))
    async with AsyncExitStack() as stack:
        pg = {"FACTORY_DATABASE_URL": postgres_url}
        envs = [factory_env(tmp_path / f"r{i}", emulator, **pg) for i in range(2)]
        stubs = [(await stack.enter_async_context(running_factory(env)))[1] for env in envs]
        device = str(uuid.uuid4())
        request = fpb.MintCertificateRequest(
            device_id=device, csr_pem=make_csr(make_key("p256"), device), request_id="csr-1"
        )
        answers = await asyncio.gather(*(stub.MintCertificate(request) for stub in stubs * 4))
        other = fpb.MintCertificateRequest(
            device_id=device, csr_pem=make_csr(make_key("p256"), device), request_id="csr-1"
        )
        reused = await failure(stubs[1].MintCertificate(other))
    serials = {answer.certificate.serial_number for answer in answers}
    assert len(serials) == 1 and sum(not answer.replayed for answer in answers) >= 1
    issued = "SELECT count(*) FROM certificates WHERE request_id = %s"
    assert await count(postgres_url, issued, "csr-1") == 1
    recorded = "SELECT serial_number FROM mint_requests WHERE request_id = %s"
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        assert await (await conn.execute(recorded, ("csr-1",))).fetchall() == [(serials.pop(),)]
    assert await count(postgres_url, "SELECT count(*) FROM mint_reservations") == 0
    assert (reused.code, reused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")


async def test_two_activation_replicas_activate_one_request_id_once(tmp_path, emulator, postgres_url):
    """The same Activate at the same instant on both replicas: one DPS write, identical answers; another
    body with the id is refused.  Then a replica killed right after it reserved an id: the retry on another
    replica is told REQUEST_IN_PROGRESS while the lease runs, and afterwards activates once."""
    from faults.test_activation_intents import activation_process

    tls = OemTls.create(tmp_path / "tls")
    extra = {"ACTIVATION_DATABASE_URL": postgres_url, "ACTIVATION_REQUESTS_LEASE_SECONDS": LEASE}
    metadata = json.dumps({"tags": {"customer": "acme"}, "properties": {"desired": {"interval_s": 5}}})
    await migrated(DatabaseUrl.parse(postgres_url))
    async with AsyncExitStack() as stack:
        _app, factory = await stack.enter_async_context(running_factory(factory_env(tmp_path, emulator)))

        async def enrolled() -> tuple[str, str]:
            device = await mint(factory, str(uuid.uuid4()), tmp_path / "devices")
            enroll = fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
            return device.device_id, (await factory.Enroll(enroll)).activation_code

        replicas = [
            await stack.enter_async_context(
                activation_process(
                    activation_env(tmp_path / name, emulator, tls, **extra), tls, tmp_path / f"{name}.log"
                )
            )
            for name in ("a", "b")
        ]
        (_, stub_a), (_, stub_b) = replicas
        device_id, code = await enrolled()
        request = activate_request(device_id, code, metadata, request_id="act-1")
        before = (await dps_enrollment(emulator, device_id))["etag"]
        answers = await asyncio.gather(*(stub.Activate(request) for stub in (stub_a, stub_b, stub_a, stub_b)))
        assert len({_answer(answer) for answer in answers}) == 1
        assert sorted(answer.replayed for answer in answers) == [False, True, True, True]
        after = await dps_enrollment(emulator, device_id)
        assert after["etag"] != before and after["etag"] == answers[0].enrollment_etag  # written once
        rows = "SELECT count(*) FROM audit WHERE request_id = %s AND action = 'activate'"
        assert await count(postgres_url, rows, "act-1") == 1  # one execution, audited once
        other = activate_request(device_id, code, json.dumps({"tags": {"customer": "x"}}), request_id="act-1")
        reused = await failure(stub_b.Activate(other))
        assert (reused.code, reused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")

        # C reserves an id and is killed at once; A is told to come back while C's lease runs, then takes over
        device_id, code = await enrolled()
        request = activate_request(device_id, code, metadata, request_id="act-2")
        env_c = activation_env(tmp_path / "c", emulator, tls, **extra)
        async with activation_process(env_c, tls, tmp_path / "c.log", crash_at="request.reserved") as (
            proc,
            stub_c,
        ):
            killed = await failure(stub_c.Activate(request))
            assert killed.code is grpc.StatusCode.UNAVAILABLE
            assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
        busy = await failure(stub_a.Activate(request, timeout=1.0))
        assert (busy.code, busy.reason) == (grpc.StatusCode.ABORTED, "REQUEST_IN_PROGRESS")
        assert await count(postgres_url, rows, "act-2") == 0
        taken = await stub_a.Activate(request, timeout=60)
        assert not taken.replayed and taken.path != apb.ACTIVATION_PATH_UNCHANGED
        assert (await dps_enrollment(emulator, device_id))["etag"] == taken.enrollment_etag
        again = await stub_b.Activate(request)
        assert again.replayed and _answer(again) == _answer(taken)
        assert await count(postgres_url, rows, "act-2") == 1


async def test_an_enroll_whose_replica_died_after_the_dps_write_is_taken_over_once(
    tmp_path, emulator, postgres_url
):
    """Enroll's work resumes safely: replica A is killed right after DPS took the enrollment (the code was
    retained first, no answer stored); the retry with the same id on B waits out A's lease, takes the
    request over and recognises A's write (UNCHANGED, the retained code): one DPS write, one working code."""
    from provkit.activation_code import verify_code

    await migrated(DatabaseUrl.parse(postgres_url))
    env = factory_env(
        tmp_path, emulator, FACTORY_DATABASE_URL=postgres_url, FACTORY_REQUESTS_LEASE_SECONDS=LEASE
    )
    a, b = FactoryProcess(env, tmp_path / "a.log"), FactoryProcess(env, tmp_path / "b.log")
    try:
        await a.start(crash_at="enroll.after_dps_write")
        await b.start()
        async with a.stub() as stub_a, b.stub() as stub_b:
            device = await mint(stub_a, str(uuid.uuid4()), tmp_path / "devices")
            request = fpb.EnrollRequest(
                device_id=device.device_id, certificate_pem=device.chain_pem, request_id="enroll-1"
            )
            killed = await failure(stub_a.Enroll(request))
            assert killed.code is grpc.StatusCode.UNAVAILABLE
            assert await a.killed() == -signal.SIGKILL
            written = await dps_enrollment(emulator, device.device_id)
            assert written is not None  # A's write reached DPS
            taken = await stub_b.Enroll(request, timeout=60)
            assert taken.outcome == fpb.ENROLL_OUTCOME_UNCHANGED and not taken.replayed
            record = written["optionalDeviceInformation"]["activationCode"]
            assert taken.activation_code and verify_code(taken.activation_code, record)
            assert (await dps_enrollment(emulator, device.device_id))["etag"] == written["etag"]
            again = await stub_b.Enroll(request)
            assert again.replayed and again.activation_code == taken.activation_code
    finally:
        await a.stop()
        await b.stop()
