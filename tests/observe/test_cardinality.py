"""Cardinality: a hundred devices through the factory add samples, never series (no label names a device)."""

from __future__ import annotations

import uuid

import pytest
from enrollment.provisioning_env import factory_env, mint, running_factory
from support.metrics import scrape

from devprov.v1 import factory_service_pb2 as fpb

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

DEVICES = 100


async def test_a_hundred_devices_add_no_series(tmp_path, emulator):
    env = factory_env(tmp_path, emulator, FACTORY_METRICS_LISTEN="127.0.0.1:0")
    async with running_factory(env) as (app, factory):
        ids = [str(uuid.uuid4()) for _ in range(DEVICES)]

        async def through(device_id: str) -> None:
            device = await mint(factory, device_id, tmp_path / "devices")
            reply = await factory.Enroll(
                fpb.EnrollRequest(device_id=device_id, certificate_pem=device.chain_pem)
            )
            assert reply.outcome == fpb.ENROLL_OUTCOME_CREATED

        await through(ids[0])
        first = await scrape(app.observe.metrics_url)
        for device_id in ids[1:]:
            await through(device_id)
        last = await scrape(app.observe.metrics_url)

    assert set(last.samples) == set(first.samples)
    minted = last.value("devprov_certificates_minted_total", mode="server-generated", key_type="ec-p256")
    assert minted == DEVICES
    assert last.value("devprov_enrollments_total", outcome="created") == DEVICES
    assert all(device_id not in last.text for device_id in ids)
