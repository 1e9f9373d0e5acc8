"""Every hostile shipment CSV (tests/support/hostile_csv.py) against every entry point that takes a shipment:
``activation-svc activate-batch`` (the real command as its own process, mTLS to activation_svc) and the
portal's ``/batch`` upload (aiohttp, CSRF token and all), both in front of one real activation_svc with the
OEM's template.  Each refuses the file as a whole, naming what is wrong; the device in it stays disabled,
its enrollment unwritten, and the command writes no result file.

A new entry point is one more walker here; a new shape is one more line in ``SHAPES``.
"""

from __future__ import annotations

import html
import re

import aiohttp
import pytest
import pytest_asyncio
from enrollment.provisioning_env import activation_client_env
from portal.portal_env import hidden_fields, templated_portal
from support.cli_process import run_module
from support.hostile_csv import SHAPES, HostileCsv, shape_id

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]  # the stack, a process per shape


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def oem(module_emulator, tmp_path_factory):
    async with templated_portal(tmp_path_factory.mktemp("hostile-csv"), module_emulator) as (stack, client):
        device, code = await stack.enrolled()
        yield stack, client, device.device_id, code


async def unchanged(stack, device_id: str, before: dict) -> None:
    after = await stack.enrollment(device_id)
    assert after["etag"] == before["etag"] and after["provisioningStatus"] == "disabled"


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
async def test_activate_batch_refuses_the_file_before_anything_is_sent(
    oem, tmp_path, shape: HostileCsv
) -> None:
    stack, _, device_id, code = oem
    before = await stack.enrollment(device_id)
    shipment = tmp_path / "shipment.csv"
    shipment.write_bytes(shape.file(device_id, code))
    env = activation_client_env(stack.activation_app.grpc_address, stack.tls)
    status, _, err = await run_module("activation_svc.cli", "activate-batch", str(shipment), env=env)
    assert status == 2, err
    assert shape.words in err and "Traceback" not in err, err
    assert code not in err
    assert not (tmp_path / "shipment.csv.results.csv").exists()
    await unchanged(stack, device_id, before)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
async def test_the_portal_refuses_the_upload_before_anything_is_sent(oem, shape: HostileCsv) -> None:
    stack, client, device_id, code = oem
    before = await stack.enrollment(device_id)
    page = await (await client.get("/batch")).text()
    form = aiohttp.FormData()
    form.add_field("csrf_token", hidden_fields(page)["csrf_token"])
    form.add_field("shipment", shape.file(device_id, code), filename="shipment.csv", content_type="text/csv")
    form.add_field("metadata", "")
    response = await client.post("/batch", data=form)
    page = await response.text()
    assert response.status == 400, page
    problem = re.search(r'id="problem"[^>]*>(.*?)</section>', page, re.S)
    assert problem is not None, page
    said = html.unescape(problem.group(1))
    assert "SHIPMENT_UNUSABLE" in said and shape.words in said, said
    assert code not in page
    await unchanged(stack, device_id, before)
