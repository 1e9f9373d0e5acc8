"""The portal at HTTP level (aiohttp's test client) against a REAL activation_svc (mTLS), a real factory_svc
and a real emulator process: every route, the service's errors shown precisely, and the safety nets."""

from __future__ import annotations

import html
import json
import re

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from enrollment.provisioning_env import hub_twin, register
from portal_env import META, activate_form, hidden_fields, portal_stack

from activation_svc.metadata import sample_metadata
from activation_svc.portal.app import create_app
from devprov.v1 import activation_service_pb2 as apb

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(module_emulator, tmp_path_factory):
    async with portal_stack(tmp_path_factory.mktemp("portal-http"), module_emulator) as stack:
        yield stack


@pytest_asyncio.fixture(loop_scope="module")
async def client(stack):
    async with TestClient(TestServer(create_app(stack.settings))) as client:
        yield client


async def form(client, path: str = "/") -> tuple[str, dict[str, str]]:
    response = await client.get(path)
    assert response.status == 200
    page = await response.text()
    return page, hidden_fields(page)


async def post_activate(client, device_id: str, code: str, metadata: str, hub: str = "", hidden=None):
    if hidden is None:
        _, hidden = await form(client)
    response = await client.post("/activate", data=activate_form(hidden, device_id, code, metadata, hub))
    return response, await response.text()


def text_of(page: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>(.*?)</(?:section|dd|div)>', page, re.S)
    assert found, f"no #{element_id} in the page"
    return re.sub(r"<[^>]+>", " ", found.group(1))


def error_of(page: str, field: str) -> str:
    """What the page says under a field (its one place for the field's problems)."""
    return html.unescape(text_of(page, f"{field}-error")).strip()


def visible(page: str) -> str:
    """The page's text as a person reads it (no markup, no attribute values, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", " ", page.split("<body>", 1)[1]))


@pytest.mark.slow
async def test_form_page_has_fields_hubs_csrf_cookie_and_security_headers_and_no_sample_values(client, stack):
    response = await client.get("/")
    assert response.status == 200 and response.content_type == "text/html"
    page = await response.text()
    for name in ("device_id", "activation_code", "hub", "metadata", "csrf_token", "request_id"):
        assert f'name="{name}"' in page
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    # the hub list is the activation service's cloud settings: the emulator's two linked hubs
    emulator = stack.emulator
    for hub in emulator.hub_hosts:
        assert f'<option value="{hub}">{hub}</option>' in page
    assert f"Default hub ({emulator.default_hub})" in page
    box = re.search(r'<textarea id="metadata"([^>]*)>(.*?)</textarea>', page, re.S)
    # nothing pre-filled that an operator could stamp onto a real twin: the shape is a placeholder only
    assert box.group(2) == "" and 'placeholder="{&quot;tags&quot;' in box.group(1)
    sample = sample_metadata()["tags"]
    assert sample["oem"] not in page and sample["chassisNumber"] not in page
    assert "<script>" not in page and ' style="' not in page  # nothing inline: the CSP forbids it
    headers = response.headers
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"
    assert "aiohttp" not in headers["Server"]
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    again = await client.get("/")  # the browser keeps its cookie: no new one
    assert "Set-Cookie" not in again.headers


async def test_activate_through_the_form_then_replay_and_already_active(client, stack):
    device, code = await stack.enrolled()
    chosen = stack.emulator.hub_hosts[1]  # not the default hub
    _, hidden = await form(client)
    response, page = await post_activate(client, device.device_id, code, json.dumps(META), chosen, hidden)
    assert response.status == 200
    assert "Activated" in text_of(page, "outcome")
    assert visible(page).count("Activated") == 1  # the outcome's heading, not repeated as the page's title
    # what happened and what next, in words: no enum names of the API
    assert "ENROLLMENT" not in visible(page) and "Outcome" not in visible(page)
    assert '<p id="next">Next: switch the device on' in page
    assert "may now come online" in text_of(page, "outcome")
    assert text_of(page, "v-lifecycle").strip() == "ACTIVATED"
    assert text_of(page, "v-hub") == chosen
    assert code not in page and code.replace("-", "") not in page

    status = await stack.status(device.device_id, code)
    assert status.lifecycle == apb.LIFECYCLE_ACTIVATED and status.provisioning_status == "enabled"
    assert status.allocated_hub == chosen
    enrollment = await stack.enrollment(device.device_id)
    assert enrollment["initialTwin"]["tags"] == META["tags"]
    assert enrollment["initialTwin"]["properties"]["desired"]["interval_s"] == 5

    # the same form sent twice (same request id): the service replays its first answer
    response, page = await post_activate(client, device.device_id, code, json.dumps(META), chosen, hidden)
    assert response.status == 200 and "sent before" in page
    assert (await stack.enrollment(device.device_id))["etag"] == enrollment["etag"]
    # a new form with the same values: already active, nothing written
    response, page = await post_activate(client, device.device_id, code, json.dumps(META), chosen)
    assert response.status == 200 and "Already active" in text_of(page, "outcome")
    assert (await stack.enrollment(device.device_id))["etag"] == enrollment["etag"]
    audit = await stack.activation_app.audit.entries(device.device_id)
    assert [(e.action, e.outcome) for e in audit] == [("activate", "ok"), ("activate", "ok")]
    # the portal's mTLS identity, and the end user it acts for
    assert audit[0].caller.startswith("urn:devprov:portal:acme for 127.0.0.1 portal sha256:")


async def test_wrong_code_shows_the_error_keeps_the_input_and_changes_nothing(client, stack):
    device, code = await stack.enrolled()
    before = await stack.enrollment(device.device_id)
    wrong = "AAAA-BBBB-CCCC-DDDD"
    response, page = await post_activate(client, device.device_id, wrong, json.dumps(META))
    assert response.status == 403
    problem = text_of(page, "problem")
    assert "wrong activation code" in problem and "ACTIVATION_DENIED" in problem
    assert f'value="{device.device_id}"' in page  # the GUID is kept ...
    assert 'id="activation_code" name="activation_code" value=""' in page  # ... the code never echoed
    assert wrong not in page
    assert re.search(r'id="activation_code"[^>]*aria-invalid="true"', page.replace("\n", " "))
    status = await stack.status(device.device_id, code)
    assert status.lifecycle == apb.LIFECYCLE_ENROLLED and status.provisioning_status == "disabled"
    assert (await stack.enrollment(device.device_id))["etag"] == before["etag"]


async def test_invalid_json_and_twin_rules_name_the_wrong_field(client, stack):
    device, code = await stack.enrolled()
    before = await stack.enrollment(device.device_id)
    response, page = await post_activate(client, device.device_id, code, '{"tags": {"a": 1,}}')
    assert response.status == 400
    problem = text_of(page, "problem")
    assert "Metadata" in problem and "METADATA_NOT_JSON" in problem
    assert error_of(page, "metadata").startswith("not valid JSON")
    assert re.search(r'id="metadata"[^>]*aria-invalid="true"', page)
    assert "{&quot;tags&quot;: {&quot;a&quot;: 1,}}" in page  # the text comes back for fixing, escaped

    bad = {"tags": {"a.b": 1}, "properties": {"desired": {"ok": True, "deep": {"x y": 2}}}}
    response, page = await post_activate(client, device.device_id, code, json.dumps(bad))
    assert response.status == 400
    problem = text_of(page, "problem")
    assert "METADATA_INVALID" in problem and "twin rules" in problem
    said = error_of(page, "metadata")
    assert "tags.a.b: keys must not contain '.'" in said
    assert "properties.desired.deep.x y" in said and "spaces" in said
    assert "tags.a.b" not in problem  # said once, under the field

    response, page = await post_activate(client, device.device_id, code, "{}", hub="elsewhere.example")
    assert response.status == 400 and "HUB_UNKNOWN" in page
    assert re.search(r'id="hub"[^>]*aria-invalid="true"', page)

    response, page = await post_activate(client, "<script>x</script>", code, "{}")
    assert response.status == 400 and "DEVICE_ID_NOT_A_GUID" in page
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    status = await stack.status(device.device_id, code)
    assert status.lifecycle == apb.LIFECYCLE_ENROLLED
    assert (await stack.enrollment(device.device_id))["etag"] == before["etag"]


async def test_size_limits_oversize_body_is_413_and_long_fields_are_named(client, stack):
    _, hidden = await form(client)
    huge = "x" * (stack.settings.max_body_bytes + 1)
    response = await client.post("/activate", data=activate_form(hidden, "gw-1", "c", huge))
    assert response.status == 413 and "Too large" in await response.text()
    assert response.headers["X-Frame-Options"] == "DENY"

    response, page = await post_activate(client, "g" * 200, "c", "{}", hidden=hidden)
    assert response.status == 400
    assert "Device ID" in text_of(page, "problem") and error_of(page, "device_id") == (
        "at most 128 characters (got 200)"
    )


async def test_csrf_missing_or_wrong_is_403_and_changes_nothing(client, stack):
    device, code = await stack.enrolled()
    _, hidden = await form(client)
    fields = activate_form(hidden, device.device_id, code, json.dumps(META))
    missing = {k: v for k, v in fields.items() if k != "csrf_token"}
    response = await client.post("/activate", data=missing)
    assert response.status == 403 and "Form expired" in await response.text()
    response = await client.post("/activate", data={**fields, "csrf_token": hidden["csrf_token"][:-2] + "AA"})
    assert response.status == 403
    # a token from another browser (another cookie) does not fit this browser's cookie
    async with TestClient(TestServer(create_app(stack.settings))) as other:
        _, other_hidden = await form(other)
    response = await client.post("/activate", data={**fields, "csrf_token": other_hidden["csrf_token"]})
    assert response.status == 403
    client.session.cookie_jar.clear()  # no cookie at all
    response = await client.post("/activate", data=fields)
    assert response.status == 403
    status = await stack.status(device.device_id, code)
    assert status.lifecycle == apb.LIFECYCLE_ENROLLED and status.provisioning_status == "disabled"
    assert await stack.activation_app.audit.entries(device.device_id) == []  # the service never saw it


async def test_status_page_before_and_after_activation(client, stack):
    device, code = await stack.enrolled()
    response = await client.get("/status", params={"device_id": device.device_id})
    assert response.status == 200
    page = await response.text()
    assert f'value="{device.device_id}"' in page
    hidden = hidden_fields(page)

    response = await client.post(
        "/status", data={**hidden, "device_id": device.device_id, "activation_code": code}
    )
    page = await response.text()
    assert response.status == 200
    assert text_of(page, "v-lifecycle").strip() == "ENROLLED"
    assert text_of(page, "v-provisioning") == "disabled"
    assert text_of(page, "v-owner").startswith("none yet")
    assert code not in page

    await post_activate(client, device.device_id, code, json.dumps(META))
    response = await client.post(
        "/status", data={**hidden, "device_id": device.device_id, "activation_code": code}
    )
    page = await response.text()
    assert text_of(page, "v-lifecycle").strip() == "ACTIVATED"
    assert text_of(page, "v-allocated-hub") == stack.emulator.default_hub
    assert text_of(page, "v-owner") == "acme"  # claimed for the OEM the portal acts for
    assert text_of(page, "v-last-activity").endswith("UTC")
    assert text_of(page, "v-activated").endswith("UTC")

    response = await client.post(
        "/status", data={**hidden, "device_id": device.device_id, "activation_code": "WXYZ-WXYZ-WXYZ-WXYZ"}
    )
    page = await response.text()
    assert response.status == 403 and "ACTIVATION_DENIED" in page and "WXYZ-WXYZ" not in page
    response = await client.post("/status", data={"device_id": device.device_id, "activation_code": code})
    assert response.status == 403  # no CSRF token


async def test_static_assets_health_404_405_and_wrong_host(client):
    css = await client.get("/static/portal.css")
    assert css.status == 200 and css.content_type == "text/css"
    js = await client.get("/static/portal.js")
    assert js.status == 200 and js.content_type == "text/javascript" and "JSON.parse" in await js.text()
    cached = await client.get("/static/portal.js", headers={"If-None-Match": js.headers["ETag"]})
    assert cached.status == 304
    assert (await client.get("/healthz")).status == 200

    for path in ("/nope", "/static/other.js", "/activate/x"):
        response = await client.get(path)
        assert response.status == 404 and "Not found" in await response.text()
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    response = await client.put("/activate", data="x")
    assert response.status == 405 and "POST" in response.headers["Allow"]
    response = await client.get("/activate", allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/"

    # DNS rebinding: a loopback-bound portal answers only to loopback host names
    response = await client.get("/", headers={"Host": "attacker.example"})
    assert response.status == 421
    assert (await client.get("/", headers={"Host": "localhost:8080"})).status == 200


@pytest.mark.slow
async def test_after_registration_new_metadata_is_shown_as_updated(client, stack):
    device, code = await stack.enrolled()
    await post_activate(client, device.device_id, code, json.dumps(META))
    assert (await register(stack.emulator, device)).status == "assigned"
    changed = {"tags": {"customer": "acme", "site": "north"}, "properties": {"desired": {"interval_s": 10}}}
    response, page = await post_activate(client, device.device_id, code, json.dumps(changed))
    assert response.status == 200
    assert "Updated" in text_of(page, "outcome") and "twin on the hub" in text_of(page, "outcome")
    assert text_of(page, "v-lifecycle").strip() == "REGISTERED"
    assert text_of(page, "v-registered-hub") == stack.emulator.default_hub
    twin = await hub_twin(stack.emulator, stack.emulator.default_hub, device.device_id)
    assert twin.tags == changed["tags"]


async def test_repeated_wrong_codes_from_one_address_wait_and_are_told_when_others_do_not(client, stack):
    device, code = await stack.enrolled()
    statuses = []
    for _ in range(6):  # the portal allows 5 wrong codes per client address, then a growing back-off
        response, page = await post_activate(client, device.device_id, "WXYZ-0000-WXYZ-0000", "{}")
        statuses.append(response.status)
    assert statuses == [403] * 5 + [429]
    assert "PORTAL_RATE_LIMITED" in page
    assert "Too many wrong activation codes were sent from your address" in page
    wait = int(response.headers["Retry-After"])
    assert wait > 0
    assert visible(page).count("Try again") == 1 and f'<p id="retry">Try again in {wait} s.</p>' in page
    response, page = await post_activate(client, device.device_id, code, "{}")
    assert response.status == 429  # this address waits, even with the right code
    denied = [e for e in await stack.activation_app.audit.entries(device.device_id) if e.outcome == "denied"]
    assert len(denied) == 5  # the sixth never reached the service
    # another party (the OEM's back office, its own certificate) is not blocked by the storm
    reply = await stack.activation.Activate(
        apb.ActivateRequest(device_id=device.device_id, activation_code=code, metadata_json="{}")
    )
    assert reply.lifecycle == apb.LIFECYCLE_ACTIVATED


@pytest.mark.slow
async def test_an_empty_metadata_field_keeps_the_live_twin_and_the_page_says_so(client, stack):
    device, code = await stack.enrolled()
    await post_activate(client, device.device_id, code, json.dumps(META))
    assert (await register(stack.emulator, device)).status == "assigned"
    hub = stack.emulator.default_hub

    response, page = await post_activate(client, device.device_id, code, "")
    assert response.status == 200
    assert "Metadata kept" in text_of(page, "outcome") and "KEPT" not in visible(page)
    twin = await hub_twin(stack.emulator, hub, device.device_id)
    assert twin.tags == META["tags"] and twin.properties.desired["interval_s"] == 5
    assert (await stack.enrollment(device.device_id))["initialTwin"]["tags"] == META["tags"]

    # "{}" would wipe it: refused with a sentence that says how to keep or to remove
    response, page = await post_activate(client, device.device_id, code, "{}")
    assert response.status == 409
    assert "METADATA_EMPTY" in page and "Remove the device&#x27;s metadata" in text_of(page, "problem")

    _, hidden = await form(client)
    data = {**activate_form(hidden, device.device_id, code, "", ""), "clear_metadata": "on"}
    response = await client.post("/activate", data=data)
    page = await response.text()
    assert response.status == 200
    assert "Metadata cleared" in text_of(page, "outcome") and "CLEARED" not in visible(page)
    twin = await hub_twin(stack.emulator, hub, device.device_id)
    assert twin.tags == {} and "interval_s" not in twin.properties.desired


async def test_a_bad_json_error_is_said_once_next_to_the_field(client, stack):
    device, _code = await stack.enrolled()
    response, page = await post_activate(client, device.device_id, _code, '{"tags": {"a": 1,}}')
    assert response.status == 400
    said = error_of(page, "metadata")
    assert said.startswith("not valid JSON: ") and "line 1 column 18" in said
    # once on the whole page, in one wording: the panel above points at the field and names the reason
    assert visible(page).count("line 1 column 18") == 1
    assert visible(page).lower().count("valid json") == 1
    problem = " ".join(html.unescape(text_of(page, "problem")).split())
    assert "Fix the field marked below: Metadata ." in problem and '<a href="#metadata">Metadata</a>' in page
    assert "INVALID_ARGUMENT METADATA_NOT_JSON" in problem


async def test_a_code_that_cannot_be_a_code_is_said_next_to_it_and_never_counted(client, stack):
    device, code = await stack.enrolled()
    for typo in ("1234", "X", "7K3M-Q9XD-2HPA-W4R", "7K3M-Q9XD-2HPA-W4RU"):  # U is not in the alphabet
        response, page = await post_activate(client, device.device_id, typo, json.dumps(META))
        assert response.status == 400, typo
        assert error_of(page, "activation_code").startswith("that is not an activation code: it has 16")
        assert visible(page).count("not an activation code") == 1
        assert "INVALID_ARGUMENT ACTIVATION_CODE_MALFORMED" in text_of(page, "problem")
        assert re.search(r'id="activation_code"[^>]*aria-invalid="true"', page.replace("\n", " "))
    for _ in range(6):  # more than the address's 5 free failures: none of them counted
        response, _page = await post_activate(client, device.device_id, "1234", "{}")
        assert response.status == 400
    response, page = await post_activate(client, device.device_id, code, json.dumps(META))
    assert response.status == 200 and "Activated" in text_of(page, "outcome")
    audit = await stack.activation_app.audit.entries(device.device_id)
    assert [e.outcome for e in audit if e.action == "activate"] == ["ok"]
