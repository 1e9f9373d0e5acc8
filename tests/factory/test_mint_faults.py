"""MintCertificate under kill -9: a real `factory-svc serve` process killed (DEVPROV_CRASH_AT) while a group
of concurrent mints is written to the ledger but not yet committed.  Every certificate it answered is in
the ledger after the restart, whole (its request id with it); nothing of the killed group is there; and a
retry of each unanswered call with its request id gets exactly one certificate."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import uuid
from pathlib import Path

import grpc
import pytest
from factory_env import make_csr, make_key
from support.factory_process import FactoryProcess
from support.parties import FACTORY_URI

from devprov.v1 import factory_service_pb2 as pb

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180), pytest.mark.slow]

CALLS = 48


async def test_killed_mid_group_no_answered_certificate_is_lost(tmp_path: Path) -> None:
    data = tmp_path / "data"
    factory = FactoryProcess(
        {
            "FACTORY_DATA_DIR": str(data),
            "FACTORY_SERVER_INSECURE": "true",
            "FACTORY_SERVER_INSECURE_IDENTITY": FACTORY_URI,
            "FACTORY_ENROLL_ENABLED": "false",
        },
        tmp_path / "factory.log",
    )
    key = make_key("p256")
    requests = []
    for i in range(CALLS):
        guid = str(uuid.uuid4())
        csr = make_csr(key, guid)
        requests.append(pb.MintCertificateRequest(device_id=guid, csr_pem=csr, request_id=f"r-{i}"))
    answered: dict[str, pb.IssuedCertificate] = {}
    refused: list[grpc.StatusCode] = []

    await factory.start(crash_at="ledger.before_commit@2")  # the second group written dies uncommitted
    async with factory.stub() as stub:

        async def mint(request: pb.MintCertificateRequest) -> None:
            try:
                reply = await stub.MintCertificate(request, timeout=60)
            except grpc.aio.AioRpcError as exc:
                refused.append(exc.code())
                return
            answered[request.request_id] = reply.certificate

        await mint(requests[0])  # the first group: committed and answered
        await asyncio.gather(*(mint(r) for r in requests[1:]))  # the next group dies with the process
    assert await factory.killed() == -signal.SIGKILL
    assert answered and refused  # some calls were answered before the kill, the rest never were
    assert set(refused) == {grpc.StatusCode.UNAVAILABLE}

    with sqlite3.connect(data / "ledger.sqlite3") as ledger:
        rows = dict(ledger.execute("SELECT request_id, certificate_pem FROM certificates").fetchall())
        requests_kept = dict(ledger.execute("SELECT request_id, serial_number FROM mint_requests").fetchall())
        serials = dict(ledger.execute("SELECT request_id, serial_number FROM certificates").fetchall())
    for request_id, certificate in answered.items():  # answered: committed, as answered
        assert rows[request_id] == certificate.certificate_pem
    assert requests_kept == serials  # each certificate with its request id, nothing half-written
    assert len(rows) < CALLS  # the killed group is not there

    await factory.start()
    try:
        async with factory.stub() as stub:
            retried = await asyncio.gather(*(stub.MintCertificate(r, timeout=60) for r in requests))
            for request, reply in zip(requests, retried, strict=True):
                if request.request_id in answered:
                    assert reply.replayed
                    assert reply.certificate == answered[request.request_id]
                elif request.request_id in rows:  # committed, but the answer never left: replayed now
                    assert reply.replayed and reply.certificate.certificate_pem == rows[request.request_id]
                else:
                    assert not reply.replayed
            listed = await stub.ListCertificates(pb.ListCertificatesRequest(page_size=500))
        by_device: dict[str, int] = {}
        for certificate in listed.certificates:
            by_device[certificate.device_id] = by_device.get(certificate.device_id, 0) + 1
        assert by_device == {r.device_id: 1 for r in requests}  # exactly one certificate per call
    finally:
        await factory.stop()
