"""The web portal with no credentials at all: 6 wrong codes from each of 20 client addresses (120 in all,
more than the old per-device ceiling of 100 that then refused everyone for 15 minutes) never stop the
owner, nor, before anyone owns the device, a person with the right code.

The real portal process pieces (aiohttp site on loopback) in front of a real activation_svc over mTLS, a real
factory_svc and the emulator; each client binds its own 127.0.x.y source address, as 20 machines would."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from enrollment.provisioning_env import mint
from portal_env import activate_form, hidden_fields, portal_stack

from activation_svc.portal.app import start_portal
from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import factory_service_pb2 as fpb

pytestmark = pytest.mark.slow

ADDRESSES = 20
TRIES = 6  # the portal lets 5 through per address, the sixth waits: 100 wrong codes reach the service
WRONG = "0000-0000-0000-0000"


@contextlib.asynccontextmanager
async def browser_at(source: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose connections come from ``source`` (a loopback address of its own)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as session:
        yield session


async def submit(session: aiohttp.ClientSession, url: str, device_id: str, code: str) -> int:
    async with session.get(f"{url}/") as form:
        hidden = hidden_fields(await form.text())
    data = activate_form(hidden, device_id, code, '{"tags": {"site": "hall 3"}}')
    async with session.post(f"{url}/activate", data=data) as response:
        await response.read()
        return response.status


async def storm(url: str, device_id: str) -> list[int]:
    statuses = []
    for n in range(ADDRESSES):
        async with browser_at(f"127.0.{100 + n}.1") as session:
            statuses += [await submit(session, url, device_id, WRONG) for _ in range(TRIES)]
    return statuses


@pytest.fixture
async def portal(tmp_path, emulator):
    async with portal_stack(tmp_path, emulator) as stack:
        running = await start_portal(stack.settings)
        try:
            yield stack, running.url
        finally:
            await running.stop()


async def test_120_wrong_codes_from_20_addresses_never_stop_the_owner(portal) -> None:
    stack, url = portal
    device = await mint(stack.factory, str(uuid.uuid4()), stack.folder / "devices")
    enroll = fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem, owner_oem="acme")
    code = (await stack.factory.Enroll(enroll)).activation_code

    statuses = await storm(url, device.device_id)
    assert statuses == ([403] * (TRIES - 1) + [429]) * ADDRESSES  # each address slowed on its own
    denied = [e for e in await stack.activation_app.audit.entries(device.device_id) if e.outcome == "denied"]
    assert len(denied) == ADDRESSES * (TRIES - 1)

    async with browser_at("127.0.99.1") as owner:  # acme's person, at acme's portal
        assert await submit(owner, url, device.device_id, code) == 200
    reply = await stack.activation.Activate(  # and acme's back office, its own certificate
        apb.ActivateRequest(device_id=device.device_id, activation_code=code)  # metadata kept
    )
    assert reply.lifecycle == apb.LIFECYCLE_ACTIVATED and reply.owner_oem == "acme"


async def test_before_anyone_owns_it_the_right_code_gets_in_after_the_same_storm(portal) -> None:
    stack, url = portal
    device, code = await stack.enrolled()  # no owner yet: the first activation claims it
    await storm(url, device.device_id)
    async with browser_at("127.0.98.1") as person:
        assert await submit(person, url, device.device_id, code) == 200
    status = await stack.status(device.device_id, code)
    assert status.lifecycle == apb.LIFECYCLE_ACTIVATED and status.owner_oem == "acme"
