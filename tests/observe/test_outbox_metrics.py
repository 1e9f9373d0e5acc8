"""The outbox gauges, read at scrape time: enrollments accepted while DPS is down wait (depth, age of the
oldest), then drain when it is back; the DPS calls that failed meanwhile are counted as unavailable."""

from __future__ import annotations

import uuid

import pytest
from enrollment.provisioning_env import connection_file, factory_env, mint, running_factory
from support.emulator import EmulatorProcess
from support.metrics import Scrape, scrape
from support.waiting import until

from devprov.v1 import factory_service_pb2 as fpb

pytestmark = pytest.mark.slow


async def _until_drained(url: str, timeout: float = 60.0) -> Scrape:
    last: list[Scrape] = []

    async def drained() -> Scrape | None:
        last[:] = [await scrape(url)]
        return last[0] if last[0].value("devprov_outbox_depth") == 0 else None

    def holds() -> str:
        return f"the outbox still holds {last[0].value('devprov_outbox_depth')}" if last else "a scrape"

    return await until(drained, holds, timeout=timeout, interval=0.2)


async def test_outbox_depth_and_age_while_dps_is_down_then_drained(tmp_path):
    emulator = EmulatorProcess(tmp_path / "emulator", hubs=1).start()
    saved = tmp_path / "connection-copy.json"  # the emulator removes connection.json when it stops
    saved.write_text(connection_file(emulator).read_text())
    emulator.stop()
    env = {
        **factory_env(tmp_path, emulator, FACTORY_METRICS_LISTEN="127.0.0.1:0"),
        "FACTORY_CLOUD_EMULATOR_CONNECTION_FILE": str(saved),
    }
    try:
        async with running_factory(env) as (app, factory):
            for _ in range(2):
                device = await mint(factory, str(uuid.uuid4()), tmp_path / "devices")
                reply = await factory.Enroll(
                    fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
                )
                assert reply.outcome == fpb.ENROLL_OUTCOME_QUEUED
            waiting = await scrape(app.observe.metrics_url)
            assert waiting.value("devprov_outbox_depth") == 2
            assert waiting.value("devprov_outbox_oldest_age_seconds") > 0
            assert waiting.value("devprov_enrollments_total", outcome="queued") == 2
            unavailable = waiting.total("devprov_cloud_calls_total", service="dps", outcome="unavailable")
            assert unavailable >= 2

            emulator.start()
            drained = await _until_drained(app.observe.metrics_url)
            assert drained.value("devprov_outbox_oldest_age_seconds") == 0
            assert drained.total("devprov_cloud_calls_total", service="dps", outcome="ok") >= 1
    finally:
        emulator.stop()
