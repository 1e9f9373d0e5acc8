"""kill -9 in a flood of refused calls (``provkit.refusal_audit``): a real ``factory-svc serve`` process that
kills itself at ``refusal_audit.repeat_counted`` loses the count of its open window, never the first
refusal, which was durable before its answer; restarted, the next refusal of the kind is a first again, and
a graceful stop writes its window's summary."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import uuid

import grpc
import pytest
from enrollment.provisioning_env import factory_env
from support.factory_process import FactoryProcess

from devprov.v1 import factory_service_pb2 as fpb

pytestmark = [pytest.mark.slow, pytest.mark.faults]


async def refuse(process: FactoryProcess, times: int) -> list[str]:
    """``times`` MintCertificate calls, one after another, until one gets no answer: the reasons answered."""
    reasons = []
    async with process.stub() as stub:
        for _ in range(times):
            request = fpb.MintCertificateRequest(
                device_id=str(uuid.uuid4()), server_key_generation=fpb.ServerKeyGeneration()
            )
            try:
                await stub.MintCertificate(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAUTHENTICATED:
                    break  # the process is gone
                reasons.append(exc.code().name)
    return reasons


def rows(folder) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(folder / "factory" / "ledger.sqlite3")) as db:
        return db.execute("SELECT reason, repeats FROM refusals ORDER BY id").fetchall()


async def test_kill_9_loses_the_open_windows_count_never_the_first_refusal(tmp_path, module_emulator) -> None:
    # insecure on loopback with no identity configured: every call but health is refused at the gate
    env = factory_env(tmp_path, module_emulator)
    settings = {k: v for k, v in env.items() if "INSECURE_IDENTITY" not in k}
    process = FactoryProcess(settings, tmp_path / "factory.log")
    await process.start(crash_at="refusal_audit.repeat_counted@50")
    answered = await refuse(process, 60)
    assert await process.killed() == -signal.SIGKILL, process.log_tail()
    assert len(answered) == 50  # the first, and 49 repeats; the 50th repeat was counted, never answered
    assert rows(tmp_path) == [("CLIENT_CERTIFICATE_REQUIRED", 0)]  # the first survived, the count did not

    await process.start()
    try:
        assert len(await refuse(process, 3)) == 3
    finally:
        await process.stop()  # SIGTERM: the window's summary is written
    assert rows(tmp_path) == [
        ("CLIENT_CERTIFICATE_REQUIRED", 0),
        ("CLIENT_CERTIFICATE_REQUIRED", 0),  # a first again after the restart
        ("CLIENT_CERTIFICATE_REQUIRED", 2),
    ]
