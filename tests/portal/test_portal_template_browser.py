"""A label's QR code in a real browser (Debian's Chromium through Playwright) against the real stack with
the OEM's template: the QR URL opens the portal with the device and the code filled in and the fragment
gone from the address bar (no request ever carries the code but the form's own POST), the template's form
is filled and sent, the device registers (Microsoft's device SDK) and its twin, read with Microsoft's
azure-iot-hub SDK, holds the typed values.  A value off the template is refused naming the field."""

from __future__ import annotations

import json
import urllib.parse

import pytest
import pytest_asyncio
from enrollment.provisioning_env import hub_twin, register
from portal_env import chromium, chromium_unavailable, portal_stack
from support.shipment import TEMPLATE
from test_portal_browser import shot

from activation_svc.portal.app import start_portal
from devprov.v1 import activation_service_pb2 as apb

_why = chromium_unavailable()
pytestmark = [
    pytest.mark.skipif(_why is not None, reason=_why or ""),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.slow,  # a browser, the stack, a DPS registration
]
async_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (make install)")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(module_emulator, tmp_path_factory):
    folder = tmp_path_factory.mktemp("portal-template")
    template = folder / "acme.schema.json"
    template.write_text(json.dumps(TEMPLATE))
    env = {"ACTIVATION_TEMPLATES": f"acme={template}"}
    async with portal_stack(folder, module_emulator, service_env=env) as stack:
        running = await start_portal(stack.settings)
        try:
            yield stack, running.url
        finally:
            await running.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def page(tmp_path):
    async with chromium(tmp_path / "profile") as context:
        page = await context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.on(
            "console",
            lambda m: (
                problems.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource")
                else None
            ),
        )
        yield page
        assert problems == [], problems  # e.g. a CSP violation


def qr_url(portal: str, device_id: str, code: str) -> str:
    """What a label's QR code encodes (the factory's half of the contract)."""
    return f"{portal}/?device={device_id}#code={urllib.parse.quote(code, safe='')}"


async def test_the_qr_url_fills_the_form_and_the_twin_gets_the_typed_values(page, stack):
    stack, portal = stack
    device, code = await stack.enrolled()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(f"{r.method} {r.url} {r.headers} {r.post_data or ''}"))
    await page.goto(qr_url(portal, device.device_id, code))
    assert await page.input_value("#device_id") == device.device_id
    assert await page.input_value("#activation_code") == code
    assert "#" not in page.url and code not in page.url  # the fragment is gone from the address bar
    assert not any(code in line for line in requests)  # ... and no request carried it
    await shot(page, "template-form-from-qr")

    await page.fill('[data-field="tags.chassisNumber"]', "VX200-20269999")
    await page.select_option('[data-field="tags.machineModel"]', json.dumps("VX-300"))
    await page.fill('[data-field="tags.site.city"]', "Gdansk")
    await page.fill('[data-field="desired.telemetryIntervalSeconds"]', "7.5")
    await page.fill('[data-field="desired.maxTemperature"]', "72")
    await page.select_option('[data-field="desired.ecoMode"]', "true")
    await shot(page, "template-form-filled")
    await page.click("button[type=submit]")
    await page.wait_for_selector("#outcome")
    assert "Activated" in await page.text_content("#outcome")
    assert code not in await page.content()
    post = [line for line in requests if line.startswith("POST ")]
    assert len(post) == 1 and code in post[0]  # the code left the browser once: in the form it sent

    status = await stack.status(device.device_id, code)
    assert status.lifecycle == apb.LIFECYCLE_ACTIVATED
    hub = (await register(stack.emulator, device)).registration_state.assigned_hub
    twin = await hub_twin(stack.emulator, hub, device.device_id)
    assert twin.tags == {
        "chassisNumber": "VX200-20269999",
        "machineModel": "VX-300",
        "site": {"city": "Gdansk"},
    }
    desired = twin.properties.desired
    assert desired["telemetryIntervalSeconds"] == 7.5 and isinstance(
        desired["telemetryIntervalSeconds"], float
    )
    assert desired["maxTemperature"] == 72 and type(desired["maxTemperature"]) is int
    assert desired["ecoMode"] is True


async def test_a_value_off_the_template_is_refused_naming_the_field(page, stack):
    stack, portal = stack
    device, code = await stack.enrolled()
    before = await stack.enrollment(device.device_id)
    await page.goto(qr_url(portal, device.device_id, code))
    await page.fill('[data-field="tags.chassisNumber"]', "AB-1")
    await page.select_option('[data-field="tags.machineModel"]', json.dumps("VX-200"))
    await page.fill('[data-field="desired.telemetryIntervalSeconds"]', "5")
    await page.click("button[type=submit]")
    await page.wait_for_selector("#problem")
    problem = await page.text_content("#problem")
    assert "METADATA_TEMPLATE_VIOLATION" in problem and "Fix the field marked below" in problem
    field = '[data-field="tags.chassisNumber"]'
    assert await page.get_attribute(field, "aria-invalid") == "true"
    ident = await page.get_attribute(field, "id")
    assert await page.get_attribute("#problem a", "href") == f"#{ident}"  # the panel points at it
    said = await page.locator(f"#{ident} ~ .field-error").first.text_content()
    assert said and (await page.text_content("main")).count(said) == 1  # the reason, once, under the field
    assert await page.input_value(field) == "AB-1"  # what was typed stays, to be corrected
    assert await page.input_value("#activation_code") == ""  # the code is never echoed back
    await shot(page, "template-violation")
    assert (await stack.enrollment(device.device_id))["etag"] == before["etag"]
