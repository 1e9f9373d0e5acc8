"""factory_svc's EnrollBatch against an emulator enforcing Azure's DPS quotas for one unit
(``--azure-quotas``) while another client floods the same DPS: the factory's calls meet real 429s with
retry-after, and the batch still ends with every enrollment in DPS exactly once (nothing lost).

How long a big batch takes against one unit is arithmetic, not a test (see the emulator README): the
factory enrolls through bulk calls of 10, each enrollment one operation of the 1,000 per minute, so 2,000
take about 1 minute against an idle unit (1,000 at once, the rest as the quota refills) and 2 minutes when
the unit's quota is already in use."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid

import aiohttp
import pytest
from provisioning_env import dps_enrollment, factory_env, mint, running_factory
from support.emulator import EmulatorProcess
from support.waiting import until

from azure_iot_emulator.sas import generate_sas
from devprov.v1 import factory_service_pb2 as pb

pytestmark = pytest.mark.slow

DEVICES = 12


@pytest.fixture
def quota_emulator(tmp_path):
    args = ["--azure-quotas", "--log-level", "WARNING"]
    emu = EmulatorProcess(tmp_path / "emulator", hubs=1, extra_args=args)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


async def flood(emu, stop: asyncio.Event, throttled: list[int]) -> None:
    """Another DPS client using up the operations quota as fast as it refills."""
    host = emu.dps_connection_string.split("HostName=", 1)[1].split(";", 1)[0]
    key = emu.dps_connection_string.split("SharedAccessKey=", 1)[1]
    token = generate_sas(host, key, policy="provisioningserviceowner", expiry=int(time.time()) + 900)
    ctx = ssl.create_default_context(cafile=str(emu.ca_path))
    url = f"https://{host}/enrollments/flood?api-version=2021-10-01"
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            async with http.get(url, headers={"Authorization": token}, ssl=ctx) as response:
                await response.read()
                if response.status == 429:
                    throttled.append(int(response.headers["Retry-After"]))
                    await asyncio.sleep(0.02)


async def test_enroll_batch_under_quotas_completes_with_nothing_lost(tmp_path, quota_emulator):
    env = factory_env(tmp_path, quota_emulator, FACTORY_CLOUD_RETRY_TOTAL="10")
    async with running_factory(env) as (_app, stub):
        devices = [await mint(stub, str(uuid.uuid4()), tmp_path) for _ in range(DEVICES)]
        stop, throttled = asyncio.Event(), []
        flooding = asyncio.create_task(flood(quota_emulator, stop, throttled))
        try:
            while not throttled:  # the quota is spent before the batch starts
                await asyncio.sleep(0.05)
            items = [pb.EnrollBatchItem(device_id=d.device_id, certificate_pem=d.chain_pem) for d in devices]
            reply = await stub.EnrollBatch(pb.EnrollBatchRequest(items=items, request_id="quota-batch"))
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await flooding
        assert reply.failed_count == 0
        assert reply.enrolled_count + reply.queued_count == DEVICES
        assert all(seconds >= 1 for seconds in throttled)
        for device in devices:  # queued ones are delivered by the outbox once the quota allows
            enrollment = await until(
                lambda: dps_enrollment(quota_emulator, device.device_id),  # noqa: B023 (awaited here)
                f"{device.device_id} in DPS",
                timeout=120,
                interval=0.5,
            )
            assert enrollment["provisioningStatus"] == "disabled"
