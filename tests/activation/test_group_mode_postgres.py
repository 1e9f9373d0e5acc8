"""Group mode with the device registry on PostgreSQL, factory_svc and activation_svc sharing it: the table
made by the operator's `activation-svc migrate` (a process), Enroll and Activate writing the records there,
a device registering with Microsoft's azure-iot-device through the emulator's DPS and the webhook, 0 DPS
writes; the database unreachable: the webhook answers 503 and DPS fails the registration (no hub at all),
and once it is back the device comes online."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
from azure.iot.device.exceptions import ClientError
from conftest import running_emulator
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    register,
    running_activation,
    running_factory,
)
from group_env import META, Stack, emulator_args, runtime_context, sha256_of
from support.pgcluster import database_away
from support.waiting import until

pytestmark = pytest.mark.slow


async def migrate(env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "activation_svc.cli",
        "migrate",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_group_mode_on_postgresql_and_503_while_the_database_is_away(
    tmp_path, pg_cluster, postgres_url
):
    tls = OemTls.create(tmp_path / "tls")
    with running_emulator(tmp_path / "emulator", emulator_args(tls)) as emulator:
        stack = Stack(tmp_path, emulator, tls)
        activation_env = {**stack.activation_env(), "ACTIVATION_REGISTRY_DATABASE_URL": postgres_url}
        factory_env = {**stack.factory_env(), "FACTORY_REGISTRY_DATABASE_URL": postgres_url}
        said = await migrate(activation_env)
        assert "device registry: migrated to this version at postgresql://" in said
        assert postgres_url.split("@")[0].split(":")[-1] not in said  # never the password
        async with (
            running_activation(activation_env, tls) as (activation_app, activation),
            running_factory(factory_env) as (_, factory),
        ):
            stack.factory, stack.activation, stack.activation_app = factory, activation, activation_app
            await stack.apply_group()
            writes = await stack.dps_writes()
            device, code = await stack.enrolled()  # the factory's record, in PostgreSQL
            chosen = emulator.hub_hosts[1]
            await activation.Activate(activate_request(device.device_id, code, json.dumps(META), chosen))
            result = await register(emulator, device)
            assert result.status == "assigned" and result.registration_state.assigned_hub == chosen
            assert await stack.dps_writes() == writes

            request = runtime_context(device.device_id, f"CN={device.device_id}", sha256_of(device), stack)
            with database_away(pg_cluster, postgres_url):
                assert (await stack.post(request))[0] == 503  # the pool's connection ended under it
                assert (await stack.post(request))[0] == 503  # no connection to be had
                with pytest.raises(ClientError):  # DPS fails the registration: no hub, never a wrong one
                    await register(emulator, device)
                assert stack.audit(device.device_id)[-1] == ("error", "REGISTRY_UNAVAILABLE")

            async def allocated() -> bool:
                return (await stack.post(request))[0] == 200

            await until(allocated, "the webhook allocates again once the database is back", timeout=60)
            result = await register(emulator, device)
            assert result.status == "assigned" and result.registration_state.assigned_hub == chosen
