"""An activation without metadata keeps the device's metadata (issue 25 item 3): its enrollment's initial twin
and its live hub twin keep their tags and desired properties; only an explicit clear removes them, and the
answer says which happened.  A real emulator process, real factory_svc and activation_svc (as a process for
the CLI, driven as a person types it), Microsoft's SDKs for the device and for reading the cloud back."""

from __future__ import annotations

import json

import grpc
import pytest
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    activation_serve_process,
    dps_enrollment,
    enrolled,
    factory_env,
    failure,
    hub_twin,
    register,
    running_activation,
    running_factory,
    set_hub_desired,
)
from support.cli_process import run_module

from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import activation_service_pb2_grpc as apb_grpc

pytestmark = pytest.mark.slow

META = {
    "tags": {"location": {"city": "Hamburg", "spot": "hall 3"}, "chassisNumber": "VX200-20260001"},
    "properties": {"desired": {"telemetryIntervalSeconds": 5, "site": "Hamburg"}},
}


def _own(section: dict) -> dict:
    """A twin section without the service's $-keys ($version, $metadata)."""
    return {k: v for k, v in section.items() if not k.startswith("$")}


async def _twin(emulator, hub: str, device_id: str) -> tuple[dict, dict]:
    """(tags, desired) of the device's hub twin, read with azure-iot-hub's IoTHubRegistryManager.get_twin."""
    twin = await hub_twin(emulator, hub, device_id)
    return dict(twin.tags or {}), _own(dict(twin.properties.desired or {}))


async def _initial_twin(emulator, device_id: str) -> tuple[dict, dict]:
    """(tags, desired) of the device's DPS enrollment's initialTwin (azure-iot-deviceprovisioning)."""
    enrollment = await dps_enrollment(emulator, device_id)
    assert enrollment is not None
    twin = enrollment.get("initialTwin") or {}
    return _own(twin.get("tags") or {}), _own((twin.get("properties") or {}).get("desired") or {})


async def test_the_cli_keeps_the_live_twin_without_metadata_and_clears_it_only_when_told(tmp_path, emulator):
    tls = OemTls.create(tmp_path / "tls")
    async with activation_serve_process(tmp_path, emulator, tls) as client_env:
        async with running_factory(factory_env(tmp_path, emulator)) as (_app, factory):
            device, code = await enrolled(factory, tmp_path)

        async def activate(*options: str) -> tuple[int, str, str]:
            return await run_module(
                "activation_svc.cli",
                "activate",
                device.device_id,
                "--code-file",
                "-",
                *options,
                env=client_env,
                stdin=code + "\n",
            )

        status, out, err = await activate("--metadata-json", json.dumps(META))
        assert status == 0, err
        assert out.endswith("; metadata replaced by the one sent.\n")
        registration = await register(emulator, device)  # the device registers: its twin is live
        hub = registration.registration_state.assigned_hub
        assert await _twin(emulator, hub, device.device_id) == (META["tags"], META["properties"]["desired"])

        # the reported command: the code from standard input, no --metadata
        status, out, err = await activate()
        assert status == 0, err
        kept = f"{device.device_id} was already activated on hub {hub}; nothing changed (metadata kept).\n"
        assert out == kept
        assert await _twin(emulator, hub, device.device_id) == (META["tags"], META["properties"]["desired"])
        assert await _initial_twin(emulator, device.device_id) == (
            META["tags"],
            META["properties"]["desired"],
        )

        status, _, err = await activate("--clear-metadata", "--metadata-json", json.dumps(META))
        assert status == 2 and "not allowed with argument" in err  # one or the other

        status, out, err = await activate("--clear-metadata", "--json")
        assert status == 0, err
        answer = json.loads(out)
        assert answer["metadata"] == "CLEARED" and answer["path"] == "ENROLLMENT_AND_HUB_TWIN"
        assert await _twin(emulator, hub, device.device_id) == ({}, {})
        assert await _initial_twin(emulator, device.device_id) == ({}, {})


@pytest.fixture
async def stack(tmp_path, emulator):
    tls = OemTls.create(tmp_path / "oem-tls")
    async with (
        running_factory(factory_env(tmp_path, emulator)) as (_factory_app, factory),
        running_activation(activation_env(tmp_path, emulator, tls), tls) as (activation_app, activation),
    ):
        yield emulator, factory, activation, activation_app


async def _activate(
    activation: apb_grpc.ActivationServiceStub, device_id: str, code: str, metadata: str = "", hub: str = ""
) -> apb.ActivateResponse:
    return await activation.Activate(activate_request(device_id, code, metadata, hub))


async def test_keeping_changes_the_hub_and_re_enables_without_touching_tags_or_desired(stack, tmp_path):
    emulator, factory, activation, app = stack
    device, code = await enrolled(factory, tmp_path)
    first = await _activate(activation, device.device_id, code, json.dumps(META))
    assert first.metadata_change == apb.METADATA_CHANGE_REPLACED
    hub = (await register(emulator, device)).registration_state.assigned_hub
    # the OEM's other tools change a desired property on the hub since: keeping keeps that too
    await set_hub_desired(emulator, hub, device.device_id, {"telemetryIntervalSeconds": 7})
    live = ({**META["tags"]}, {**META["properties"]["desired"], "telemetryIntervalSeconds": 7})
    assert await _twin(emulator, hub, device.device_id) == live
    initial = (META["tags"], META["properties"]["desired"])

    confirmed = await _activate(activation, device.device_id, code)
    assert confirmed.path == apb.ACTIVATION_PATH_UNCHANGED
    assert confirmed.metadata_change == apb.METADATA_CHANGE_KEPT
    assert confirmed.enrollment_etag == first.enrollment_etag
    assert await _twin(emulator, hub, device.device_id) == live

    other_hub = next(h for h in emulator.hub_hosts if h != hub)
    moved = await _activate(activation, device.device_id, code, hub=other_hub)
    assert moved.path == apb.ACTIVATION_PATH_ENROLLMENT and moved.hub == other_hub
    assert moved.metadata_change == apb.METADATA_CHANGE_KEPT
    assert (await dps_enrollment(emulator, device.device_id))["iotHubs"] == [other_hub]
    assert await _initial_twin(emulator, device.device_id) == initial
    assert await _twin(emulator, hub, device.device_id) == live

    # empty metadata would wipe it: refused, nothing written; so is metadata together with the clear flag
    empty = await failure(activation.Activate(activate_request(device.device_id, code, "{}", other_hub)))
    assert (empty.code, empty.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "METADATA_EMPTY")
    both = await failure(
        activation.Activate(
            apb.ActivateRequest(
                device_id=device.device_id,
                activation_code=code,
                metadata_json=json.dumps(META),
                clear_metadata=True,
            )
        )
    )
    assert (both.code, both.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "METADATA_CONFLICT")
    assert (await dps_enrollment(emulator, device.device_id))["etag"] == moved.enrollment_etag

    # deactivated, then activated again without metadata: enabled again on its hub, metadata as it was
    await activation.Deactivate(apb.DeactivateRequest(device_id=device.device_id, activation_code=code))
    back = await _activate(activation, device.device_id, code, hub=other_hub)
    assert back.path == apb.ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN
    assert back.metadata_change == apb.METADATA_CHANGE_KEPT and back.registered_hub == hub
    status = await activation.GetDeviceStatus(
        apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
    )
    assert status.provisioning_status == "enabled" and status.hub_device_status == "enabled"
    assert await _initial_twin(emulator, device.device_id) == initial
    assert await _twin(emulator, hub, device.device_id) == live

    audit = await app.audit.entries(device.device_id)
    done = [e.detail for e in audit if e.action == "activate" and e.outcome == "ok"]
    assert len(done) == 4 and "metadata_sha256=" in done[0]
    assert all("metadata=kept" in detail for detail in done[1:])
    assert [e.detail for e in audit if e.outcome == "error"] == ["METADATA_EMPTY"]
