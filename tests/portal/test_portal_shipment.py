"""The portal's /batch page: a shipment CSV uploaded (multipart, CSRF checked), each row activated through
activation_svc with the OEM's template, the result table shown; the same file sent again is answered from
the first sending (no row done twice); files that cannot be used are refused before anything is sent."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from portal_env import activate_form, hidden_fields, templated_portal
from support.shipment import enroll_shipment, shipment_csv

from activation_svc.portal.app import create_app
from activation_svc.portal.settings import PortalSettings

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]  # the stack


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def portal(module_emulator, tmp_path_factory):
    # Registration ids (which GUIDs are too) for the service and the portal alike: the rows follow it.
    folder = tmp_path_factory.mktemp("portal-shipment")
    async with templated_portal(folder, module_emulator, ACTIVATION_DEVICE_IDS="registration-id") as found:
        yield found


@contextlib.asynccontextmanager
async def portal_client(settings: PortalSettings) -> AsyncIterator[TestClient]:
    """Another portal in front of the same service (its own per-address limits)."""
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def upload(client: TestClient, csv_text: str, *, csrf: bool = True) -> tuple[int, str]:
    page = await (await client.get("/batch")).text()
    form = aiohttp.FormData()
    if csrf:
        form.add_field("csrf_token", hidden_fields(page)["csrf_token"])
    form.add_field("shipment", csv_text.encode(), filename="shipment.csv", content_type="text/csv")
    form.add_field("metadata", "")
    response = await client.post("/batch", data=form)
    return response.status, await response.text()


def table(page: str) -> list[list[str]]:
    body = re.search(r'<table id="results">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert body is not None, page
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1), re.S)
    return [
        [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)] for r in rows
    ]


async def test_a_shipment_is_activated_from_an_upload_and_a_resend_does_nothing_twice(portal):
    stack, client = portal
    devices = await enroll_shipment(stack.factory_app, stack.factory, 5)
    text = shipment_csv(devices, fields={3: {"desired.telemetryIntervalSeconds": "0"}})
    page = await (await client.get("/batch")).text()
    assert "tags.chassisNumber" in page and "desired.ecoMode" in page  # the columns the template asks for
    status, page = await upload(client, text)
    assert status == 200, page
    rows = table(page)
    assert [r[2] for r in rows] == ["activated"] * 3 + ["refused"] + ["activated"]
    assert rows[3][3:5] == [
        "METADATA_TEMPLATE_VIOLATION",
        "metadata_json.properties.desired.telemetryIntervalSeconds",
    ]
    assert "4 of 5 activated" in page
    assert all(code not in page for _, code in devices)
    enrollment = await stack.enrollment(devices[0][0])
    assert enrollment["initialTwin"]["properties"]["desired"]["telemetryIntervalSeconds"] == 5
    assert (await stack.enrollment(devices[3][0]))["provisioningStatus"] == "disabled"

    status, page = await upload(client, text)  # the same file again
    assert status == 200
    again = table(page)
    assert [r[2] for r in again] == ["activated (earlier)"] * 3 + ["refused"] + ["activated (earlier)"]
    assert (await stack.enrollment(devices[0][0]))["etag"] == enrollment["etag"]


async def test_unusable_uploads_are_refused_before_anything_is_sent(portal):
    stack, client = portal
    devices = await enroll_shipment(stack.factory_app, stack.factory, 1)
    status, page = await upload(client, shipment_csv(devices), csrf=False)
    assert status == 403 and "Form expired" in page
    status, page = await upload(client, "guid,code,tags.colour\nx,y,red\n")
    assert status == 400 and "SHIPMENT_UNUSABLE" in page and "tags.colour" in page
    status, page = await upload(client, "guid,code\n")
    assert status == 400 and "no devices" in page
    page = await (await client.get("/batch")).text()
    form = aiohttp.FormData()
    form.add_field("csrf_token", hidden_fields(page)["csrf_token"])
    csv_bytes = shipment_csv(devices).encode()
    form.add_field("shipment", csv_bytes, filename="shipment.csv", content_type="text/csv")
    form.add_field("metadata", b'{"tags": {}}', filename="metadata.json", content_type="application/json")
    response = await client.post("/batch", data=form)
    page = await response.text()
    assert response.status == 400 and "SHIPMENT_UNUSABLE" in page and "sent as a file" in page
    assert (await stack.enrollment(devices[0][0]))["provisioningStatus"] == "disabled"


async def test_rows_take_the_device_ids_the_service_takes(portal):
    stack, client = portal
    assert stack.settings.device_ids == "registration-id"
    wrong = "WXYZ-0000-WXYZ-0000"
    status, page = await upload(client, shipment_csv([("pump-7", wrong), ("Pump 7!", wrong)]))
    assert status == 200, page
    rows = table(page)
    assert rows[0][3] == "ACTIVATION_DENIED"  # a registration id: asked, and unknown to the service
    assert rows[1][2] == "refused" and rows[1][3].startswith("DEVICE_ID_") and rows[1][4] == "device_id"
    with_guids = dataclasses.replace(stack.settings, device_ids="guid")
    async with portal_client(with_guids) as guid_client:
        status, page = await upload(guid_client, shipment_csv([("pump-7", wrong)]))
    assert status == 200 and table(page)[0][3] == "DEVICE_ID_NOT_A_GUID"


async def test_wrong_codes_in_a_shipment_count_against_the_address(portal):
    stack, _ = portal
    strict = dataclasses.replace(stack.settings, max_failures_per_address=2)
    devices = [str(uuid.uuid4()) for _ in range(4)]
    wrong = "WXYZ-0000-WXYZ-0000"
    async with portal_client(strict) as client:
        status, page = await upload(client, shipment_csv([(d, wrong) for d in devices]))
        assert status == 200, page
        reasons = sorted(r[3] for r in table(page))
        assert reasons == ["ACTIVATION_DENIED"] * 2 + ["PORTAL_RATE_LIMITED"] * 2
        page = await (await client.get("/")).text()
        single = activate_form(hidden_fields(page), devices[0], wrong, "{}")
        response = await client.post("/activate", data=single)
        assert response.status == 429  # the single form waits too: one budget per address
