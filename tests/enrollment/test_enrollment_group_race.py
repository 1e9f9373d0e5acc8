"""Two runs of `factory-svc enrollment-group` at once, as two real processes against the emulator: both
read "no group" (first runs), then both create it; or both read the group and update it.  DPS (Azure's and
the emulator's) answers the second create 409 (a create carries no etag), the second update 412 (its etag
is stale); the run that lost reads the group again and says what it finds, never "created" or "updated":
the other run's settings (exit 4, ENROLLMENT_GROUP_CONFLICT, what DPS holds, nothing of its own written) or
its own (the other run wanted the same: "unchanged", exit 0).

The interleaving is made certain, not hoped for: the runs reach DPS through a TLS reverse proxy of the
test's own, which forwards every request as it came (signed anew for the emulator's host name: a DPS SAS
token names the host it was made for) but holds the group's writes until both runs have read it, then
forwards them one after the other (the order they came in)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from activation.group_env import KEY, Stack
from aiohttp import web
from enrollment.provisioning_env import OemTls, running_factory
from support.certs import TestCa
from support.cli_process import run_module
from support.emulator import fresh_addresses

from azure_iot_emulator.sas import generate_sas

pytestmark = pytest.mark.slow

HTTPS = 443  # as on Azure: the connection string names the bare host
_SKIPPED_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


class HoldingProxy:
    """Forwards DPS service calls to the emulator; a PUT of the group waits until ``readers`` GETs of it
    have been answered, then the PUTs pass one at a time."""

    def __init__(self, emulator, group_id: str, readers: int) -> None:
        self.emulator = emulator
        self.path = f"/enrollmentGroups/{group_id}"
        self.readers = readers
        self.reads = 0
        self.all_read = asyncio.Event()
        self.one_at_a_time = asyncio.Lock()
        self.writes: list[int] = []  # the status DPS answered each forwarded PUT of the group
        fields = dict(p.split("=", 1) for p in emulator.dps_connection_string.split(";") if "=" in p)
        self._policy, self._key = fields["SharedAccessKeyName"], fields["SharedAccessKey"]

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        ours = request.path.rstrip("/").lower() == self.path.lower()
        if ours and request.method == "PUT":
            await self.all_read.wait()
            async with self.one_at_a_time:
                response = await self._send(request, body)
            self.writes.append(response.status)
            return response
        response = await self._send(request, body)
        if ours and request.method == "GET":
            self.reads += 1
            if self.reads >= self.readers:
                self.all_read.set()
        return response

    async def _send(self, request: web.Request, body: bytes) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIPPED_HEADERS}
        if "Authorization" in headers:
            expiry = int(time.time()) + 3600
            headers["Authorization"] = generate_sas(
                self.emulator.dps_host, self._key, policy=self._policy, expiry=expiry
            )
        url = f"https://{self.emulator.dps_host}:{self.emulator.https_port}{request.path_qs}"
        trust = ssl.create_default_context(cafile=str(self.emulator.ca_path))
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session,
            session.request(request.method, url, headers=headers, data=body) as answer,
        ):
            data = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _SKIPPED_HEADERS}
            return web.Response(status=answer.status, body=data, headers=kept)


@asynccontextmanager
async def holding_proxy(tmp_path: Path, emulator, group_id: str) -> AsyncIterator[tuple[HoldingProxy, dict]]:
    """The proxy listening on a fresh loopback address, and the factory settings that reach DPS through it."""
    (host,) = fresh_addresses(1, (emulator.dps_host, *emulator.hub_hosts))
    pki = TestCa("proxy CA").server(tmp_path / "proxy", [host])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert_path, pki.key_path)
    proxy = HoldingProxy(emulator, group_id, readers=2)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, HTTPS, ssl_context=context).start()
    hostname = next(p for p in emulator.dps_connection_string.split(";") if p.startswith("HostName="))
    through = emulator.dps_connection_string.replace(hostname, f"HostName={host}")
    try:
        yield (
            proxy,
            {"FACTORY_CLOUD_DPS_CONNECTION_STRING": through, "FACTORY_CLOUD_CA_FILE": str(pki.ca_path)},
        )
    finally:
        await runner.cleanup()


async def enrollment_group(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """The operator's command as its own process: exit code, standard output, standard error."""
    return await run_module(
        "factory_svc.cli", "enrollment-group", "--json", *args, env={**os.environ, **env}, timeout=120
    )


@pytest.mark.parametrize(
    ("before", "settings"), [("absent", "other"), ("absent", "same"), ("there", "other")]
)
async def test_of_two_runs_at_once_only_one_says_it_wrote(tmp_path, module_emulator, before, settings):
    """Both read the same (no group, or the group with every hub), both write; one write wins."""
    emulator = module_emulator
    stack = Stack(tmp_path, emulator, OemTls.create(tmp_path / "tls"))
    async with running_factory(stack.factory_env()):
        pass  # the factory's CA, made once before the runs read it
    group_id = f"race-{uuid.uuid4().hex[:12]}"
    common = ("--group-id", group_id, "--webhook-url", stack.webhook)
    if before == "there":  # every hub linked (the default); each run below links one
        code, out, err = await enrollment_group(stack.factory_env(), *common)
        assert code == 0 and json.loads(out)["outcome"] == "created", err
    hubs = [emulator.hub_hosts[0], emulator.hub_hosts[1] if settings == "other" else emulator.hub_hosts[0]]
    async with holding_proxy(tmp_path, emulator, group_id) as (proxy, through):
        env = {**stack.factory_env(), **through}
        runs = await asyncio.gather(*(enrollment_group(env, *common, "--hub", hub) for hub in hubs))
    lost = 409 if before == "absent" else 412  # a create of a group that exists; a stale etag
    assert proxy.reads >= 2 and sorted(proxy.writes) == [200, lost], runs  # both read, both wrote
    wrote = "created" if before == "absent" else "updated"
    (winner,) = [
        n for n, (code, out, _) in enumerate(runs) if code == 0 and json.loads(out)["outcome"] == wrote
    ]
    code, out, err = runs[1 - winner]
    if settings == "other":
        assert code == 4 and out == "", err
        assert "[ENROLLMENT_GROUP_CONFLICT]" in err and "another run wrote the enrollment group" in err
        assert hubs[winner] in err and KEY not in err
    else:
        assert code == 0, err
        assert json.loads(out)["outcome"] == "unchanged"
    # DPS holds the winner's settings: the same command again (straight to the emulator) leaves them
    code, out, err = await enrollment_group(stack.factory_env(), *common, "--hub", hubs[winner])
    assert code == 0 and json.loads(out)["outcome"] == "unchanged", err
