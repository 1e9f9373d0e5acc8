"""A simulated fleet across worker processes against the real emulator: it boots and reports, and a worker
killed mid-run is reported and leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
from support.certs import TestCa
from support.fleet import enrolled_fleet, fleet_overrides
from support.waiting import until

from device_client.fleet import LOST, FleetRunner

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for every purpose but its parent's bookkeeping
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


async def test_a_hundred_devices_in_two_workers_boot_report_and_a_killed_worker_is_reported(
    emulator, tmp_path
):
    root = tmp_path / "devices"
    guids = await enrolled_fleet(TestCa(), emulator, root, 100)
    runner = FleetRunner(guids, root, fleet_overrides(emulator), workers=2, log_dir=tmp_path / "logs")
    await runner.start()
    pids = runner.worker_pids()
    assert len(set(pids)) == 2
    runner.go()
    try:
        await until(runner.all_acknowledged, lambda: f"acknowledged by all: {runner.report()}", timeout=300)
        report = runner.report()
        assert report["counts"]["registered"] == 100, report
        assert report["counts"]["telemetry_acknowledged"] == 100, report
        assert report["ok"] and report["workers"] == 2
        assert report["first_telemetry_s"]["max"] is not None

        await runner.kill_worker(1)
        lost = [r for r in runner.records.values() if r.worker == 1]
        assert lost and all(r.state == LOST for r in lost)
        assert runner.lost and "SIGKILL" in runner.lost[0]
        assert not runner.report()["ok"]
    finally:
        await runner.stop()
    assert not any(_alive(pid) for pid in pids)
    # the survivor stopped gracefully and said so
    assert all(r.state == "STOPPED" for r in runner.records.values() if r.worker == 0)


async def test_simulate_boots_the_devices_under_the_state_root_and_reports_json(emulator, tmp_path):
    root = tmp_path / "devices"
    guids = await enrolled_fleet(TestCa(), emulator, root, 6)
    env = {
        **os.environ,
        "DEVICE_CLIENT_STATE_ROOT": str(root),
        "DEVICE_CLIENT_ID_SCOPE": emulator.id_scope,
        "DEVICE_CLIENT_GLOBAL_ENDPOINT": emulator.dps_host,
        "DEVICE_CLIENT_TRUSTED_CA_FILE": str(emulator.ca_path),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "device_client", "simulate", "--existing", "--workers", "2",
        "--spread", "1", "--until-telemetry", "--json",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-2000:]
    report = json.loads(out)
    assert report["ok"] and report["workers"] == 2 and not report["lost_workers"]
    assert report["counts"]["telemetry_acknowledged"] == len(guids) == report["counts"]["devices"]
    assert "status:" in err.decode()  # the summary goes to stderr when stdout carries the report
