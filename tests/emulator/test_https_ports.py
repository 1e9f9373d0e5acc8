"""The HTTPS port of every host, as on Azure: one listener per address serves the host's service REST API
(so connection strings are ``HostName=<host>;...`` with no port) next to the routes that authenticate
devices themselves (the DPS device API, MQTT over WebSockets), which the service's SAS guard lets through.
Port 443 without the privilege to bind it stops the start with the ways out; another chosen port goes into
the connection strings, which Python's SDKs follow."""

from __future__ import annotations

import asyncio
import ctypes
import ssl
import subprocess
import sys

import aiohttp
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient
from azure.iot.hub import IoTHubRegistryManager
from conftest import free_loopback_address
from support.emulator import EmulatorProcess

PR_CAPBSET_DROP = 24
CAP_NET_BIND_SERVICE = 10


def _without_bind_privilege() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Drop CAP_NET_BIND_SERVICE from the bounding set, so even root cannot bind 443 after exec (a user
    without the capability has nothing to drop and the call fails harmlessly)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE, 0, 0, 0)


def test_port_443_without_the_privilege_stops_with_the_ways_out(tmp_path):
    data = tmp_path / "data"
    dps, hub = free_loopback_address(), free_loopback_address()
    result = subprocess.run(
        [sys.executable, "-m", "azure_iot_emulator", "serve", "--data-dir", str(data),
         "--dps-host", dps, "--hub-host", hub],
        capture_output=True, text=True, timeout=120, preexec_fn=_without_bind_privilege,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"iot-emulator: error: cannot listen on port 443 of {dps}: ")
    for way_out in ("needs root or CAP_NET_BIND_SERVICE", "setcap cap_net_bind_service=+ep", "--https-port"):
        assert way_out in message
    assert not (data / "connection.json").exists()


async def test_one_listener_per_host_serves_its_service_api_and_the_device_routes(module_emulator):
    emu = module_emulator
    assert emu.dps_connection_string.startswith(f"HostName={emu.dps_host};")
    for host, connection_string in zip(emu.hub_hosts, emu.hub_connection_strings, strict=True):
        assert connection_string.startswith(f"HostName={host};SharedAccessKeyName=iothubowner;")
    ctx = ssl.create_default_context(cafile=str(emu.ca_path))
    async with aiohttp.ClientSession() as http:

        async def get(
            host: str, path: str, method: str = "GET", **kwargs: object
        ) -> tuple[int, dict[str, str], bytes]:
            async with http.request(method, f"https://{host}{path}", ssl=ctx, **kwargs) as r:
                return r.status, dict(r.headers), await r.read()

        # The service API wants a SAS; a path no route knows gets the service's own error answer.
        status, headers, _ = await get(emu.dps_host, "/enrollments/x?api-version=2021-10-01")
        assert status == 401 and "x-ms-error-code" in headers
        status, headers, _ = await get(emu.default_hub, "/devices?api-version=2021-04-12")
        assert status == 401 and headers["iothub-errorcode"] == "IotHubUnauthorizedAccess"
        # The DPS device API on the same port judges the device by its certificate, not by a SAS.
        status, _, body = await get(
            emu.dps_host, f"/{emu.id_scope}/registrations/dev-1/register?api-version=2021-06-01",
            method="PUT", json={"registrationId": "dev-1"},
        )  # fmt: skip
        assert status == 401 and b"client certificate" in body
        # MQTT over WebSockets on every host: a plain GET is told it is not an upgrade, not asked for a SAS.
        for host in (emu.dps_host, *emu.hub_hosts):
            status, _, body = await get(host, "/$iothub/websocket")
            assert status == 400 and b"WebSocket upgrade" in body


@pytest.mark.slow
async def test_another_https_port_goes_into_the_connection_strings_which_python_sdks_follow(tmp_path):
    emu = EmulatorProcess(tmp_path / "emu", hubs=1, https_port=0).start()
    try:
        port = emu.https_port
        assert port != 443
        hub = emu.hub_hosts[0]
        assert emu.dps_connection_string.startswith(f"HostName={emu.dps_host}:{port};")
        assert emu.hub_connection_string(hub).startswith(f"HostName={hub}:")
        async with DeviceProvisioningClient.from_connection_string(
            emu.dps_connection_string, connection_verify=str(emu.ca_path)
        ) as dps:
            with pytest.raises(ResourceNotFoundError):
                await dps.enrollment.get(id="nobody")
        registry = IoTHubRegistryManager.from_connection_string(emu.hub_connection_string(hub))
        registry.protocol.config.connection.verify = str(emu.ca_path)
        assert await asyncio.to_thread(registry.get_devices, 10) == []
    finally:
        emu.stop()
