"""`activation-svc portal` as a real subprocess (mTLS to a real activation_svc, HTTPS; or plaintext gRPC to a
loopback service that is not there), and the settings that keep it safe by default."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys

import aiohttp
import pytest
import pytest_asyncio
from enrollment.provisioning_env import connection_file
from portal_env import hidden_fields, portal_stack
from support.emulator import free_port

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]
START_TIMEOUT = 30


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(module_emulator, tmp_path_factory):
    async with portal_stack(tmp_path_factory.mktemp("portal-serve"), module_emulator) as stack:
        yield stack


async def start_cli(*args: str, env: dict[str, str] | None = None):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "activation_svc", "portal", "--listen", "127.0.0.1:0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
    )  # fmt: skip
    line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)).decode().strip()
    if not line:
        err = await proc.stderr.read()
        raise AssertionError(f"the portal did not start: {err.decode()}")
    return proc, line


async def stop_cli(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_cli_mtls_to_the_service_serves_https_and_prints_its_address(stack):
    tls = stack.tls
    proc, line = await start_cli(
        "--target", stack.activation_app.grpc_address,
        "--ca-file", str(tls.ca_file), "--cert-file", str(tls.client_cert), "--key-file", str(tls.client_key),
        "--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key),
        env={"ACTIVATION_CLOUD_EMULATOR_CONNECTION_FILE": str(connection_file(stack.emulator))},
    )  # fmt: skip
    try:
        assert line.startswith("portal listening on https://127.0.0.1:")
        url = line.removeprefix("portal listening on ")
        assert int(url.rsplit(":", 1)[1]) > 0
        trust = ssl.create_default_context(cafile=str(tls.ca_file))
        device, code = await stack.enrolled()
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(f"{url}/status", ssl=trust) as response:
                assert response.status == 200
                assert response.headers["Strict-Transport-Security"].startswith("max-age=")
                cookie = response.headers["Set-Cookie"]
                assert cookie.startswith("__Host-portal-csrf=") and "Secure" in cookie
                hidden = hidden_fields(await response.text())
            form = {**hidden, "device_id": device.device_id, "activation_code": code}
            async with session.post(f"{url}/status", data=form, ssl=trust) as response:
                page = await response.text()
                assert response.status == 200, page
                assert "ENROLLED" in page and code not in page
    finally:
        assert await stop_cli(proc) == 0


async def test_cli_plaintext_loopback_variant_reports_an_unreachable_service(tmp_path):
    target = f"127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    proc, line = await start_cli(
        "--insecure", "--target", target, env={"ACTIVATION_CLOUD_EMULATOR_CONNECTION_FILE": ""}
    )
    try:
        assert line.startswith("portal listening on http://127.0.0.1:")
        url = line.removeprefix("portal listening on ")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(url) as response:
                hidden = hidden_fields(await response.text())
            form = {
                **hidden,
                "device_id": "gw-1",
                "activation_code": "ABCD-EFGH-JKMN-PQRS",
                "metadata": "{}",
                "hub": "",
            }
            async with session.post(f"{url}/activate", data=form) as response:
                page = await response.text()
        assert response.status == 503
        assert "activation service cannot be reached" in page and "UNAVAILABLE" in page
    finally:
        assert await stop_cli(proc) == 0
