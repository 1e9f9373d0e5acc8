"""Activate as a recorded intent, proven with a real activation_svc process killed with SIGKILL between its
steps: after a restart (or on the next call for the device) DPS and the hub twin agree with the intent,
the tag the change removed is gone from the twin, and the audit has one finished row per change."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace as dc_replace
from pathlib import Path

import grpc
import pytest
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    dps_enrollment,
    factory_env,
    hub_twin,
    mint,
    register,
    running_factory,
    set_hub_desired,
)
from support.cli_process import wait_serving
from support.emulator import free_port

from activation_svc.app import ActivationApp
from activation_svc.model import ActivateCommand, ActivationPath
from activation_svc.settings import load_settings as load_activation_settings
from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import activation_service_pb2_grpc as apb_grpc
from devprov.v1 import factory_service_pb2 as fpb
from provkit.channels import create_channel
from provkit.cloud import InitialTwin
from provkit.dps import DpsEnrollments
from provkit.faults import CRASH_ENV

pytestmark = [pytest.mark.faults, pytest.mark.slow]

BEFORE = {
    "tags": {"customer": "acme", "line": {"hall": 3}},
    "properties": {"desired": {"interval_s": 5, "mode": "eco"}},
}
AFTER = {"tags": {"customer": "acme", "site": "north"}, "properties": {"desired": {"interval_s": 10}}}


@asynccontextmanager
async def activation_process(
    env: dict[str, str], tls: OemTls, log: Path, crash_at: str = ""
) -> AsyncIterator[tuple[asyncio.subprocess.Process, apb_grpc.ActivationServiceStub]]:
    """``activation-svc serve`` as its own process (mTLS), with a crash point armed or none."""
    port = free_port("127.0.0.1")
    full = {**os.environ, **env, "ACTIVATION_SERVER_PORT": str(port)}
    full.pop(CRASH_ENV, None)
    if crash_at:
        full[CRASH_ENV] = crash_at
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "activation_svc.cli", "serve", env=full, stdout=out, stderr=out
        )
    target = f"127.0.0.1:{port}"
    try:
        await wait_serving(target, tls.client_security(), "activation-svc serve")
        async with create_channel(target, tls.client_security()) as channel:
            yield proc, apb_grpc.ActivationServiceStub(channel)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)


def audit_rows(data_dir: Path, device_id: str) -> list[tuple[str, str, str, str]]:
    with sqlite3.connect(data_dir / "audit.sqlite3") as db:
        return db.execute(
            "SELECT action, request_id, outcome, detail FROM audit WHERE device_id = ? ORDER BY id",
            (device_id,),
        ).fetchall()


def open_intents(data_dir: Path) -> list[tuple[str, str | None, int]]:
    with sqlite3.connect(data_dir / "audit.sqlite3") as db:
        return db.execute(
            "SELECT request_id, dps_etag, hub_done FROM activation_intents WHERE state = 'open'"
        ).fetchall()


@pytest.fixture
async def crashed(tmp_path, emulator):
    """A registered device activated with BEFORE, then a change to AFTER (request id ``r-crash``) whose
    activation_svc process is killed at the crash point the test names."""
    tls = OemTls.create(tmp_path / "tls")
    env = activation_env(tmp_path, emulator, tls)
    data_dir = Path(env["ACTIVATION_DATA_DIR"])

    async def crash_at(point: str, change: str = json.dumps(AFTER), move: bool = False, drift=None):
        """``change``: the second activation's metadata; ``move``: to the other hub; ``drift``: desired
        properties another tool sets on the hub twin before it."""
        async with running_factory(factory_env(tmp_path, emulator)) as (_app, factory):
            device = await mint(factory, str(uuid.uuid4()), tmp_path / "devices")
            enrolled = await factory.Enroll(
                fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
            )
        code = enrolled.activation_code
        async with activation_process(env, tls, tmp_path / "activation.log", crash_at=point) as (proc, stub):
            await stub.Activate(activate_request(device.device_id, code, json.dumps(BEFORE)))
            hub = (await register(emulator, device)).registration_state.assigned_hub
            assert (await hub_twin(emulator, hub, device.device_id)).tags == BEFORE["tags"]
            if drift:
                await set_hub_desired(emulator, hub, device.device_id, drift)
            other = next(h for h in emulator.hub_hosts if h != hub) if move else ""
            with pytest.raises(grpc.aio.AioRpcError) as killed:
                await stub.Activate(
                    activate_request(device.device_id, code, change, other, request_id="r-crash"),
                    timeout=30,
                )
            assert killed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
        return device, code, hub

    return tls, env, data_dir, crash_at


async def test_killed_between_dps_and_hub_twin_a_restart_completes_the_change(crashed, tmp_path, emulator):
    tls, env, data_dir, crash_at = crashed
    device, code, hub = await crash_at("activate.after_dps@2")  # the second activation's DPS write

    # what the crash left: DPS has the change, the hub twin not, the audit says so
    enrollment = await dps_enrollment(emulator, device.device_id)
    assert enrollment["initialTwin"]["tags"] == AFTER["tags"]
    twin = await hub_twin(emulator, hub, device.device_id)
    assert twin.tags == BEFORE["tags"]
    rows = audit_rows(data_dir, device.device_id)
    assert [(r[1], r[2]) for r in rows] == [("", "ok"), ("r-crash", "pending")]
    assert open_intents(data_dir) == [("r-crash", None, 0)]

    async with activation_process(env, tls, tmp_path / "activation.log") as (_proc, stub):
        twin = await hub_twin(emulator, hub, device.device_id)  # completed before it served
        assert twin.tags == AFTER["tags"]  # "line" removed from the hub, not left behind
        assert twin.properties.desired["interval_s"] == 10 and "mode" not in twin.properties.desired
        assert (await dps_enrollment(emulator, device.device_id))["etag"] == enrollment["etag"]
        rows = audit_rows(data_dir, device.device_id)
        assert [(r[1], r[2]) for r in rows] == [("", "ok"), ("r-crash", "ok")]
        assert "completed after an interruption" in rows[1][3] and "path=enrollment+hub-twin" in rows[1][3]
        assert open_intents(data_dir) == []

        retry = await stub.Activate(
            activate_request(device.device_id, code, json.dumps(AFTER), request_id="r-crash")
        )
        assert retry.path == apb.ACTIVATION_PATH_UNCHANGED
        status = await stub.GetDeviceStatus(
            apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
        )
        assert status.lifecycle == apb.LIFECYCLE_REGISTERED and status.owner_oem == "acme"


async def test_killed_before_the_dps_write_the_next_call_for_the_device_completes_it(crashed, emulator):
    _tls, env, data_dir, crash_at = crashed
    device, code, hub = await crash_at("activate.after_intent@2")  # recorded, nothing written outside

    assert (await dps_enrollment(emulator, device.device_id))["initialTwin"]["tags"] == BEFORE["tags"]
    assert [(r[1], r[2]) for r in audit_rows(data_dir, device.device_id)] == [
        ("", "ok"),
        ("r-crash", "pending"),
    ]

    # the same service, not started as a server (no start-up pass): the next call for the device finishes
    app = await ActivationApp.open(load_activation_settings(env=env))
    try:
        status = await app.service.status(device.device_id, code)
        assert status.registered_hub == hub
        enrollment = await dps_enrollment(emulator, device.device_id)
        assert enrollment["initialTwin"]["tags"] == AFTER["tags"]
        assert enrollment["optionalDeviceInformation"]["owner"] == {"oem": "acme"}
        twin = await hub_twin(emulator, hub, device.device_id)
        assert twin.tags == AFTER["tags"] and "mode" not in twin.properties.desired
        again = await app.service.activate(ActivateCommand(device.device_id, code, json.dumps(AFTER)))
        assert again.path is ActivationPath.UNCHANGED
    finally:
        await app.close()
    rows = audit_rows(data_dir, device.device_id)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("activate", "", "ok"),
        ("activate", "r-crash", "ok"),
        ("activate", "", "ok"),
    ]
    assert "completed after an interruption" in rows[1][3]
    assert open_intents(data_dir) == []


async def test_an_interrupted_change_that_another_change_overtook_is_closed_as_an_error_and_writes_nothing(
    crashed, emulator
):
    _tls, env, data_dir, crash_at = crashed
    device, _code, hub = await crash_at("activate.after_intent@2")
    settings = load_activation_settings(env=env)
    dps = await DpsEnrollments.open(settings.cloud.dps)
    try:  # meanwhile another replica changes the device (its own intent, finished)
        current = await dps.get(device.device_id)
        assert current is not None
        other = InitialTwin({"customer": "acme", "line": {"hall": 4}}, {"interval_s": 5, "mode": "eco"})
        await dps.update(dc_replace(current, initial_twin=other))
    finally:
        await dps.close()

    app = await ActivationApp.open(settings)
    try:
        server = await app.start()  # the start-up pass finds the intent overtaken
        await server.stop(0)
    finally:
        await app.close()
    enrollment = await dps_enrollment(emulator, device.device_id)
    assert enrollment["initialTwin"]["tags"] == {"customer": "acme", "line": {"hall": 4}}
    assert (await hub_twin(emulator, hub, device.device_id)).tags == BEFORE["tags"]
    rows = audit_rows(data_dir, device.device_id)
    assert [(r[1], r[2]) for r in rows] == [("", "ok"), ("r-crash", "error")]
    assert rows[1][3].startswith("ENROLLMENT_CHANGED_CONCURRENTLY")
    assert open_intents(data_dir) == []


async def test_a_change_keeping_the_metadata_killed_after_dps_leaves_the_live_twin_alone(
    crashed, tmp_path, emulator
):
    """No metadata, another hub: the intent keeps the metadata, so finishing it after the crash does not
    write the enrollment's twin over what another tool set on the hub meanwhile."""
    tls, env, data_dir, crash_at = crashed
    device, code, hub = await crash_at("activate.after_dps@2", change="", move=True, drift={"interval_s": 7})
    enrollment = await dps_enrollment(emulator, device.device_id)
    assert enrollment["iotHubs"] != [hub] and enrollment["initialTwin"]["tags"] == BEFORE["tags"]
    assert open_intents(data_dir) == [("r-crash", None, 0)]

    async with activation_process(env, tls, tmp_path / "activation.log") as (_proc, stub):
        assert open_intents(data_dir) == []  # completed before it served
        twin = await hub_twin(emulator, hub, device.device_id)
        assert twin.tags == BEFORE["tags"]
        assert twin.properties.desired["interval_s"] == 7 and twin.properties.desired["mode"] == "eco"
        rows = audit_rows(data_dir, device.device_id)
        assert [(r[1], r[2]) for r in rows] == [("", "ok"), ("r-crash", "ok")]
        assert "metadata=kept" in rows[1][3] and "completed after an interruption" in rows[1][3]
        retry = await stub.Activate(
            activate_request(device.device_id, code, "", enrollment["iotHubs"][0], request_id="r-crash")
        )
        assert retry.path == apb.ACTIVATION_PATH_UNCHANGED  # the crash kept its answer from being stored
        assert retry.metadata_change == apb.METADATA_CHANGE_KEPT
