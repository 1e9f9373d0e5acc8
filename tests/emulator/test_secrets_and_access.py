"""Secrets at rest and who may use them, against a real emulator process: the data directory is 0700 and
every file holding a key 0600 (also when it existed looser); every hub has its own keys, so a token for
one hub is refused by the other; a token's audience (``sr``), policy and expiry are checked, scoped as
Azure scopes them."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
import time

import aiohttp
import pytest
from azure.iot.hub import IoTHubRegistryManager
from msrest.exceptions import HttpOperationError
from support.emulator import EmulatorProcess

from azure_iot_emulator.sas import generate_sas


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def parts(connection_string: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in connection_string.split(";"))


@pytest.mark.slow
def test_data_directory_0700_and_key_files_0600_also_when_they_existed_looser(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    emu = EmulatorProcess(data, hubs=1)
    emu.start()
    try:
        db = data / "emulator.db"
        assert mode(data) == 0o700
        for name in ("emulator.db", "connection.json", "emulator-ca.key"):
            assert mode(data / name) == 0o600, name
        for companion in (data / "emulator.db-wal", data / "emulator.db-shm"):
            if companion.exists():
                assert mode(companion) == 0o600, companion.name
        keys = [p for p in data.iterdir() if p.suffix == ".key"]
        assert keys and all(mode(p) == 0o600 for p in keys)
    finally:
        emu.stop()
    os.chmod(data, 0o755)
    os.chmod(db, 0o644)
    emu.start()
    try:
        assert mode(data) == 0o700 and mode(db) == 0o600
    finally:
        emu.stop()


async def rest_status(emu, host: str, path: str, authorization: str) -> int:
    ctx = ssl.create_default_context(cafile=str(emu.ca_path))
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"https://{host}{path}?api-version=2021-04-12",
            headers={"Authorization": authorization},
            ssl=ctx,
        ) as response,
    ):
        if response.status == 401:
            assert response.headers.get("iothub-errorcode") == "IotHubUnauthorizedAccess"
        return response.status


async def test_every_hub_has_its_own_key_and_a_token_for_one_is_refused_by_the_other(
    module_emulator, monkeypatch
):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(module_emulator.ca_path))
    first, second = (parts(cs) for cs in module_emulator.hub_connection_strings)
    assert first["SharedAccessKey"] != second["SharedAccessKey"]
    assert module_emulator.dps_connection_string.split("SharedAccessKey=")[1] not in (
        first["SharedAccessKey"], second["SharedAccessKey"],
    )
    # Hub one's key presented to hub two, through Microsoft's SDK.
    crossed = (
        f"HostName={second['HostName']};SharedAccessKeyName=iothubowner;"
        f"SharedAccessKey={first['SharedAccessKey']}"
    )
    with pytest.raises(HttpOperationError) as refused:
        await asyncio.to_thread(IoTHubRegistryManager.from_connection_string(crossed).get_devices, 10)
    assert refused.value.response.status_code == 401
    # Hub two's own key, but a token whose audience is hub one.
    expiry = int(time.time()) + 600
    key = second["SharedAccessKey"]
    for_first = generate_sas(first["HostName"], key, policy="iothubowner", expiry=expiry)
    assert await rest_status(module_emulator, second["HostName"], "/devices", for_first) == 401
    own = generate_sas(second["HostName"], second["SharedAccessKey"], policy="iothubowner", expiry=expiry)
    assert await rest_status(module_emulator, second["HostName"], "/devices", own) == 200


@pytest.mark.parametrize(
    ("resource", "path", "policy", "ttl", "expected"),
    [
        ("{hub}", "/devices", "iothubowner", 600, 200),
        ("https://{hub}/", "/devices", "iothubowner", 600, 200),
        ("{hub}:443", "/devices", "iothubowner", 600, 200),  # the port the request reached, spelled out
        ("{hub}/devices", "/devices/x-1", "iothubowner", 600, 404),  # scoped to /devices: allowed
        ("{hub}/twins", "/devices/x-1", "iothubowner", 600, 401),  # scoped elsewhere
        ("{hub}/dev", "/devices", "iothubowner", 600, 401),  # not a whole-segment prefix
        ("evil.example.com", "/devices", "iothubowner", 600, 401),
        ("{hub}:1", "/devices", "iothubowner", 600, 401),  # another port of the same host
        ("{hub}", "/devices", "registryRead", 600, 401),
        ("{hub}", "/devices", "iothubowner", -5, 401),
    ],
)
async def test_hub_rest_sas_audience_policy_and_expiry(
    module_emulator, resource, path, policy, ttl, expected
):
    hub = parts(module_emulator.hub_connection_strings[0])
    host = hub["HostName"]  # Azure's shape: the bare host, its REST API on 443
    assert host == module_emulator.default_hub
    token = generate_sas(
        resource.format(hub=host), hub["SharedAccessKey"], policy=policy, expiry=int(time.time()) + ttl
    )
    assert await rest_status(module_emulator, host, path, token) == expected
