"""Fault injection: real factory_svc and `factory-svc enroll-batch` processes killed with SIGKILL at the step
boundaries that matter (DEVPROV_CRASH_AT), restarted, re-run; then the invariant, counted: every enrolled
device has exactly one usable code, the last one the codes file holds for it (usable = enrolled, lost = 0),
and once the labels are acknowledged the factory keeps no code, only the hashes in DPS."""

from __future__ import annotations

import csv
import signal
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from provisioning_env import dps_enrollment, factory_env, mint, stopped_emulator
from support.factory_process import FactoryProcess
from test_enroll_outbox_emulator import wait_state

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.enrollment.codes_file import read_codes
from provkit.activation_code import verify_code

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240), pytest.mark.slow]

EXIT_UNREACHABLE = 3


class Factory(FactoryProcess):
    def retained(self) -> int:
        with sqlite3.connect(Path(self.env["FACTORY_DATA_DIR"]) / "enrollments.sqlite3") as db:
            return int(db.execute("SELECT count(*) FROM retained_codes").fetchone()[0])


async def _minted(factory: Factory, folder: Path, count: int) -> list[str]:
    async with factory.stub() as stub:
        return [(await mint(stub, str(uuid.uuid4()), folder)).device_id for _ in range(count)]


async def _usable(emulator, codes: Path, device_ids: list[str]) -> tuple[int, int]:
    """(enrolled devices, enrolled devices whose last code in the file opens their enrollment)."""
    in_file = read_codes(codes)
    enrolled = usable = 0
    for device_id in device_ids:
        enrollment = await dps_enrollment(emulator, device_id)
        if enrollment is None:
            continue
        enrolled += 1
        record = enrollment["optionalDeviceInformation"]["activationCode"]
        usable += device_id in in_file and verify_code(in_file[device_id], record)
    return enrolled, usable


def _rows(codes: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(codes.read_text().splitlines()))


@pytest.fixture
async def factory(tmp_path, module_emulator) -> AsyncIterator[Factory]:
    running = Factory(factory_env(tmp_path, module_emulator), tmp_path / "factory.log")
    try:
        yield running
    finally:
        await running.stop()


async def test_factory_killed_between_the_dps_write_and_the_answer(factory, module_emulator, tmp_path):
    """30 devices in chunks of 10; factory_svc dies right after DPS took the third chunk's bulk write."""
    await factory.start(crash_at="enroll.after_dps_write@3")
    devices = await _minted(factory, tmp_path / "certs", 30)
    codes = tmp_path / "codes.csv"

    status, err = await factory.batch(tmp_path / "certs", codes, "--chunk", "10")
    assert status == EXIT_UNREACHABLE and await factory.killed() == -signal.SIGKILL
    assert "not answered (10)" in err
    assert len(read_codes(codes)) == 20  # the two answered chunks, on disk at the crash
    assert await _usable(module_emulator, codes, devices) == (30, 20)  # DPS holds all 30

    await factory.start()
    status, err = await factory.batch(tmp_path / "certs", codes, "--chunk", "10")
    assert status == 0, err
    assert "not answered" not in err and "no code in the file" not in err
    rerun = _rows(codes)[20:]  # all 30 unchanged: the first 20 acknowledged (no code), the last 10 retained
    assert [r["outcome"] for r in rerun] == ["UNCHANGED"] * 30
    assert [bool(r["activation_code"]) for r in rerun] == [False] * 20 + [True] * 10
    assert await _usable(module_emulator, codes, devices) == (30, 30)
    assert factory.retained() == 0  # every label acknowledged: only the hashes remain


@pytest.mark.parametrize("crash_at", ["enroll_batch.answered@2", "enroll_batch.after_chunk@2"])
async def test_batch_cli_killed_before_or_after_writing_a_chunk(factory, module_emulator, tmp_path, crash_at):
    await factory.start()
    devices = await _minted(factory, tmp_path / "certs", 30)
    codes = tmp_path / "codes.csv"

    status, _err = await factory.batch(tmp_path / "certs", codes, "--chunk", "10", crash_at=crash_at)
    assert status == -signal.SIGKILL, _err
    after_writing = crash_at.startswith("enroll_batch.after_chunk")
    assert len(read_codes(codes)) == (20 if after_writing else 10)
    # the second chunk answered but not on disk (not acknowledged): its codes are kept, encrypted
    assert factory.retained() == (0 if after_writing else 10)

    status, err = await factory.batch(tmp_path / "certs", codes, "--chunk", "10")
    assert status == 0, err
    assert await _usable(module_emulator, codes, devices) == (30, 30)
    assert factory.retained() == 0


async def test_lost_codes_file_and_a_crash_during_rotation_end_with_one_usable_code_each(
    factory, module_emulator, tmp_path
):
    await factory.start(crash_at="rotate.after_dps_write@3")
    devices = await _minted(factory, tmp_path / "certs", 12)
    codes = tmp_path / "codes.csv"
    assert (await factory.batch(tmp_path / "certs", codes))[0] == 0
    old = read_codes(codes)
    codes.unlink()  # the file is lost after the labels were acknowledged: no copy of any code is left

    status, err = await factory.batch(tmp_path / "certs", codes)
    assert status == 1 and "enrolled with no code in the file (12), run again with --rotate-missing" in err
    assert await _usable(module_emulator, codes, devices) == (12, 0)

    status, err = await factory.batch(tmp_path / "certs", codes, "--rotate-missing")
    assert status == EXIT_UNREACHABLE and await factory.killed() == -signal.SIGKILL  # on the third rotation
    assert len(read_codes(codes)) == 2 and "enrolled with no code in the file (10)" in err

    await factory.start()
    status, err = await factory.batch(tmp_path / "certs", codes, "--rotate-missing")
    assert status == 0, err
    assert await _usable(module_emulator, codes, devices) == (12, 12)
    rows = _rows(codes)
    # the device whose rotation was written but not answered got that code back as UNCHANGED, not a fourth
    assert sum(r["outcome"] == "ROTATED" for r in rows) == 11
    assert sum(r["outcome"] == "UNCHANGED" and r["activation_code"] != "" for r in rows) == 1
    for device_id, code in old.items():  # every old code is dead
        enrollment = await dps_enrollment(module_emulator, device_id)
        assert not verify_code(code, enrollment["optionalDeviceInformation"]["activationCode"])
    assert factory.retained() == 0


async def test_factory_killed_after_queueing_and_during_the_outbox_flush(tmp_path):
    """DPS down: factory_svc dies right after queueing 6 enrollments, before answering; restarted, a
    re-run gets the 6 retained codes, another re-run queues nothing twice; DPS back: factory_svc dies after
    the bulk delivery of the 6 reached DPS but before the outbox marked any of them delivered (at the
    second entry's crash point); after a restart each is delivered exactly once (its write recognised, not
    made again) and every code in the file works."""
    emulator, settings = stopped_emulator(tmp_path)
    factory = Factory(settings, tmp_path / "factory.log")
    try:
        await factory.start(crash_at="enroll.after_queue@1")
        devices = await _minted(factory, tmp_path / "certs", 6)
        codes = tmp_path / "codes.csv"
        status, err = await factory.batch(tmp_path / "certs", codes)
        assert status == EXIT_UNREACHABLE and await factory.killed() == -signal.SIGKILL
        assert "not answered (6)" in err and read_codes(codes) == {}

        await factory.start(crash_at="outbox.after_dps_write@2")
        status, err = await factory.batch(tmp_path / "certs", codes)
        assert status == 0, err
        assert [r["outcome"] for r in _rows(codes)] == ["QUEUED"] * 6 and len(read_codes(codes)) == 6
        # a re-run while DPS is still down queues nothing twice and hands out no second code
        status, err = await factory.batch(tmp_path / "certs", codes)
        assert status == 0, err
        assert [(r["outcome"], r["activation_code"]) for r in _rows(codes)[6:]] == [("QUEUED", "")] * 6

        emulator.start()
        assert await factory.killed() == -signal.SIGKILL
        await factory.start()
        async with factory.stub() as stub:
            for device_id in devices:
                await wait_state(stub, device_id, pb.ENROLLMENT_STATE_DELIVERED)
        assert await _usable(emulator, codes, devices) == (6, 6)
        with sqlite3.connect(tmp_path / "factory" / "enrollments.sqlite3") as db:
            rows = db.execute("SELECT device_id, state, outcome FROM outbox ORDER BY seq").fetchall()
        assert sorted(d for d, _, _ in rows) == sorted(devices)  # one entry each
        assert {state for _, state, _ in rows} == {"delivered"}
        # the bulk write survived the crash: each retry recognised its entry's write instead of writing again
        assert [outcome for _, _, outcome in rows] == ["already-applied"] * 6
    finally:
        await factory.stop()
        emulator.stop()
