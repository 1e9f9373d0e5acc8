"""The portal in a real browser: Debian's headless Chromium driven by Playwright, against the real stack
(activation_svc over mTLS, factory_svc, emulator process).  A screenshot of each page lands in
artifacts/portal/.  Where Chromium is not installed these tests skip with the reason (`make browser`)."""

from __future__ import annotations

import json

import pytest
import pytest_asyncio
from portal_env import ARTIFACTS, META, chromium, chromium_unavailable, portal_stack

from activation_svc.portal.app import start_portal
from devprov.v1 import activation_service_pb2 as apb

_why = chromium_unavailable()
pytestmark = [
    pytest.mark.skipif(_why is not None, reason=_why or ""),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.slow,  # a browser
]
async_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (make install)")

@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(module_emulator, tmp_path_factory):
    async with portal_stack(tmp_path_factory.mktemp("portal-browser"), module_emulator) as stack:
        yield stack


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def portal_url(stack):
    running = await start_portal(stack.settings)
    try:
        yield running.url
    finally:
        await running.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser(tmp_path_factory):
    async with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:  # a fresh user-data-dir
        yield context


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser):
    page = await browser.new_page()
    problems: list[str] = []

    def on_console(message) -> None:
        url = message.location.get("url", "")
        expected = message.text.startswith("Failed to load resource") and url.endswith(
            ("/activate", "/status")
        )
        if message.type in ("error", "warning") and not expected:  # refusals answer 4xx on purpose
            problems.append(f"{message.text} ({url})")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    yield page
    await page.close()
    assert problems == [], f"the browser reported: {problems}"  # e.g. a CSP violation


async def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def fill_activation(page, url: str, device_id: str, code: str, metadata: str, hub: str = "") -> None:
    await page.goto(url + "/")
    await page.fill("#device_id", device_id)
    await page.fill("#activation_code", code)
    if hub:
        await page.select_option("#hub", hub)
    await page.fill("#metadata", metadata)


async def test_activate_a_freshly_enrolled_device_in_the_browser(page, portal_url, stack):
    device, code = await stack.enrolled()
    chosen = stack.emulator.hub_hosts[1]
    await page.goto(portal_url + "/")
    await shot(page, "activate-form")
    await fill_activation(page, portal_url, device.device_id, code, json.dumps(META), chosen)
    # the little script checks and pretty-prints the JSON (it runs under the CSP: no inline code)
    await page.click("#format-json")
    assert await page.input_value("#metadata") == json.dumps(META, indent=2)
    assert await page.text_content("#metadata-check") == "Valid JSON."
    await shot(page, "activate-form-filled")
    await page.click("button[type=submit]")
    await page.wait_for_selector("#outcome")
    assert "Activated" in await page.text_content("#outcome")
    assert (await page.text_content("#v-lifecycle")).strip() == "ACTIVATED"
    assert await page.text_content("#v-hub") == chosen
    assert code not in await page.content()
    await shot(page, "result-activated")

    status = await stack.status(device.device_id, code)
    assert status.lifecycle == apb.LIFECYCLE_ACTIVATED and status.allocated_hub == chosen

    await page.click("text=Check its status")
    assert await page.input_value("#device_id") == device.device_id
    await shot(page, "status-form")
    await page.fill("#activation_code", code)
    await page.click("button[type=submit]")
    await page.wait_for_selector("#v-lifecycle")
    assert (await page.text_content("#v-lifecycle")).strip() == "ACTIVATED"
    assert await page.text_content("#v-allocated-hub") == chosen
    await shot(page, "status")


async def test_wrong_code_shows_the_error_and_changes_nothing(page, portal_url, stack):
    device, code = await stack.enrolled()
    before = await stack.enrollment(device.device_id)
    await fill_activation(page, portal_url, device.device_id, "WXYZ-2345-WXYZ-2345", json.dumps(META))
    await page.click("button[type=submit]")
    await page.wait_for_selector("#problem")
    problem = await page.text_content("#problem")
    assert "wrong activation code" in problem and "ACTIVATION_DENIED" in problem
    assert await page.input_value("#device_id") == device.device_id
    assert await page.input_value("#activation_code") == ""  # never echoed back
    assert await page.get_attribute("#activation_code", "aria-invalid") == "true"
    await shot(page, "error-wrong-code")

    status = await stack.status(device.device_id, code)
    assert status.lifecycle == apb.LIFECYCLE_ENROLLED and status.provisioning_status == "disabled"
    assert (await stack.enrollment(device.device_id))["etag"] == before["etag"]


async def test_invalid_json_is_said_once_under_the_field_and_the_form_is_not_sent(page, portal_url, stack):
    device, code = await stack.enrolled()
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    await fill_activation(page, portal_url, device.device_id, code, '{"tags": {"site": "north",}}')
    said = await page.text_content("#metadata-error")
    assert said.startswith("Not valid JSON: ")  # checked in the page as it is typed
    await page.click("button[type=submit]")
    assert await page.evaluate("document.activeElement.id") == "metadata"  # taken back to the field
    assert posts == []  # its own check said the JSON is invalid: nothing sent
    assert await page.get_attribute("#metadata", "aria-invalid") == "true"
    assert await page.text_content("#metadata-check") == ""  # the message once, in one place
    assert (await page.text_content("main")).count("Not valid JSON") == 1
    await shot(page, "error-invalid-json")

    # JSON the page accepts but the twin rules refuse: the service's answer, once, under the field
    bad_key = {"tags": {"site.name": "north"}, "properties": {"desired": {}}}
    await page.fill("#metadata", json.dumps(bad_key))
    assert await page.text_content("#metadata-error") == ""  # fixed: the page's message is gone
    await page.click("button[type=submit]")
    await page.wait_for_selector("#problem")
    assert len(posts) == 1
    problem = await page.text_content("#problem")
    assert "METADATA_INVALID" in problem and "tags.site.name" not in problem  # said under the field
    said = await page.text_content("#metadata-error")
    assert "tags.site.name: keys must not contain '.'" in said
    assert (await page.text_content("main")).count("keys must not contain") == 1
    assert await page.text_content("#metadata-check") == ""  # the page does not add its own note
    await shot(page, "error-twin-rules")
    status = await stack.status(device.device_id, code)
    assert status.lifecycle == apb.LIFECYCLE_ENROLLED


async def test_a_code_that_cannot_be_a_code_is_refused_before_anything_is_sent(page, portal_url, stack):
    device, code = await stack.enrolled()
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    for typo in ("1234", "7K3M-Q9XD-2HPA-W4RU", ""):
        await fill_activation(page, portal_url, device.device_id, typo, json.dumps(META))
        await page.click("button[type=submit]")
        said = await page.text_content("#activation_code-error")
        if typo:
            assert said.startswith("That is not an activation code: it has 16 letters and digits"), typo
        else:
            assert said == "Type the activation code printed on the label."
        assert await page.evaluate("document.activeElement.id") == "activation_code"
        assert await page.get_attribute("#activation_code", "aria-invalid") == "true"
        await shot(page, "error-not-a-code")
    assert posts == []
    # typing clears it; forgiving like the service: case, spaces and O for 0 are fine
    await page.fill("#activation_code", code.lower().replace("-", " ").replace("0", "o"))
    assert await page.text_content("#activation_code-error") == ""
    await page.click("button[type=submit]")
    await page.wait_for_selector("#outcome")
    assert len(posts) == 1 and "Activated" in await page.text_content("#outcome")
    assert "switch the device on" in await page.text_content("#outcome")
    await shot(page, "result-after-typo")
