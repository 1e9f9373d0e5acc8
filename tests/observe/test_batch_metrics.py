"""EnrollBatch's items in /metrics: each counted once by its outcome (refusals of the id policy and of the
domain alike), a replayed batch as replayed; the answer keeps request order when some items are refused
before the domain sees the rest."""

from __future__ import annotations

import uuid

import pytest
from enrollment.provisioning_env import factory_env, mint, running_factory
from support.metrics import Scrape, scrape

from devprov.v1 import factory_service_pb2 as fpb

pytestmark = pytest.mark.slow


def counted(after: Scrape, before: Scrape, outcome: str) -> float:
    name = "devprov_enrollments_total"
    return after.value(name, outcome=outcome) - before.value(name, outcome=outcome)


async def test_each_batch_item_is_counted_once_by_its_outcome(tmp_path, module_emulator):
    env = factory_env(tmp_path, module_emulator, FACTORY_METRICS_LISTEN="127.0.0.1:0")
    async with running_factory(env) as (app, factory):
        a, b = [await mint(factory, str(uuid.uuid4()), tmp_path / "devices") for _ in range(2)]
        items = [
            (a.device_id, a.chain_pem),
            ("not-a-guid", a.chain_pem),  # refused by the id policy, before the domain
            (b.device_id, b.chain_pem),
            (str(uuid.uuid4()), a.chain_pem),  # refused by the domain: another device's certificate
        ]
        request = fpb.EnrollBatchRequest(
            items=[fpb.EnrollBatchItem(device_id=d, certificate_pem=c) for d, c in items], request_id="m-1"
        )
        before = await scrape(app.observe.metrics_url)
        reply = await factory.EnrollBatch(request)
        middle = await scrape(app.observe.metrics_url)
        again = await factory.EnrollBatch(request)
        after = await scrape(app.observe.metrics_url)

    assert [r.index for r in reply.results] == [0, 1, 2, 3]
    assert [r.device_id for r in reply.results][::2] == [a.device_id, b.device_id]
    assert [r.error.reason for r in reply.results][1::2] == [
        "DEVICE_ID_NOT_A_GUID",
        "CERTIFICATE_SUBJECT_MISMATCH",
    ]
    assert (counted(middle, before, "created"), counted(middle, before, "refused")) == (2, 2)
    assert counted(middle, before, "replayed") == 0
    assert again.replayed and counted(after, middle, "replayed") == 4
    assert counted(after, middle, "created") == counted(after, middle, "refused") == 0
