"""The whole story with real services: `provision` mints (CSR) and enrolls through factory_svc, the device
waits for activation, the OEM activates it through activation_svc (mTLS) with metadata and a hub, and the
device reaches telemetry on that hub with the metadata applied and acknowledged."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from conftest import running_emulator
from device_cloud import get_twin, received_telemetry
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    factory_env,
    running_activation,
    running_factory,
)
from runtime_wait import snapshot_until
from support.softhsm import init_token_ca

from device_client.factory_client import GrpcFactory
from device_client.provisioning import ProvisionRequest, provision_with
from device_client.runtime import DeviceRuntime, DeviceState
from device_client.settings import load_settings
from factory_svc.ca.pkcs11_signer import Pkcs11Signer

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture
def emulator(tmp_path):
    """Azure's asynchronous registration (202 assigning, then the SDK polls), the emulator's default: the
    whole story goes through it once, where the other tests' emulators answer at once."""
    with running_emulator(tmp_path / "emulator", ["--assignment-delay", "1"]) as emu:
        yield emu


@pytest.mark.parametrize("ca_backend", ["file", "pkcs11"])
async def test_factory_to_first_telemetry(tmp_path, emulator, monkeypatch, request, ca_backend):
    """With the issuing key in a file (development CA) or in a PKCS#11 token (SoftHSM2)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))
    ca_env: dict[str, str] = {}
    if ca_backend == "pkcs11":
        ca_env = (await init_token_ca(request.getfixturevalue("softhsm"), tmp_path / "token-ca")).env
    tls = OemTls.create(tmp_path / "oem-tls")
    guid = str(uuid.uuid4())
    async with (
        running_factory(factory_env(tmp_path, emulator, **ca_env)) as (factory_app, factory_stub),
        running_activation(activation_env(tmp_path, emulator, tls), tls) as (_activation_app, activation),
    ):
        settings = load_settings(
            env={},
            overrides={
                "state_root": str(tmp_path / "devices"),
                "id_scope": emulator.id_scope,
                "global_endpoint": emulator.dps_host,
                "trusted_ca_file": str(emulator.ca_path),
                "telemetry_interval_s": 5,
                "backoff_initial_s": 0.2,
                "backoff_max_s": 1.0,
                "sdk_timeout_s": 15,
            },
        )
        async with GrpcFactory(settings.factory, stub=factory_stub) as factory:
            result = await provision_with(factory, ProvisionRequest(guid), settings)
        assert result.enrollment == "live"
        assert result.activation_code  # shown once by the CLI
        assert result.identity.chain_length == 3
        assert factory_app.ca.certificate == factory_app.ca.chain[0]
        if ca_backend == "pkcs11":
            assert isinstance(factory_app.ca.signer, Pkcs11Signer)

        # The field: the device only has its state directory (settings.toml written at provisioning).
        field = load_settings(
            env={},
            device_settings=tmp_path / "devices" / guid / "settings.toml",
            overrides={
                "state_root": str(tmp_path / "devices"),
                "backoff_initial_s": 0.2,
                "backoff_max_s": 1.0,
            },
        )
        runtime = DeviceRuntime(guid, field)
        task = asyncio.create_task(runtime.run())
        try:
            await snapshot_until(runtime, task, lambda s: s.state is DeviceState.WAITING_FOR_ACTIVATION)
            hub = emulator.hub_hosts[1]  # the OEM chooses the second hub
            metadata = {
                "tags": {"customer": "acme", "machine": "press-7"},
                "properties": {
                    "desired": {"telemetryIntervalSeconds": 0.25, "recipe": {"name": "steel", "v": 3}}
                },
            }
            reply = await activation.Activate(
                activate_request(guid, result.activation_code, json.dumps(metadata), hub)
            )
            assert reply.hub == hub
            snap = await snapshot_until(runtime, task, lambda s: s.telemetry_sent >= 3)
            assert snap.assigned_hub == hub
            assert snap.interval_s == 0.25
        finally:
            runtime.stop()
            await asyncio.wait_for(task, 30)
    twin = await get_twin(emulator, guid, hub)
    assert twin.tags == metadata["tags"]
    reported = twin.properties.reported
    assert reported["telemetryIntervalSeconds"]["ac"] == 200
    assert reported["recipe"]["value"] == {"name": "steel", "v": 3}
    seqs = [m["seq"] for m in await received_telemetry(emulator, guid, hub)]
    assert seqs[:3] == [1, 2, 3]


async def test_enrollment_resumes_for_a_stored_identity(tmp_path, emulator):
    """Minted but not enrolled (e.g. DPS work failed at the bench): `provision` again enrolls the stored
    certificate without minting a new one; once enrolled, it refuses without --force."""
    from device_client.errors import IdentityExistsError
    from device_client.state import StateDir
    from devprov.v1 import factory_service_pb2 as fpb

    guid = str(uuid.uuid4())
    settings = load_settings(env={}, overrides={"state_root": str(tmp_path / "devices")})
    async with running_factory(factory_env(tmp_path, emulator)) as (_app, stub):
        async with GrpcFactory(settings.factory, stub=stub) as factory:
            minted = await provision_with(factory, ProvisionRequest(guid, enroll=False), settings)
            assert minted.enrollment == "skipped"
            resumed = await provision_with(factory, ProvisionRequest(guid), settings)
            assert not resumed.minted and resumed.enrollment == "live" and resumed.activation_code
            assert resumed.identity.serial_hex == minted.identity.serial_hex
            with pytest.raises(IdentityExistsError):
                await provision_with(factory, ProvisionRequest(guid), settings)
        issued = await stub.ListCertificates(fpb.ListCertificatesRequest(device_id=guid))
    assert len(issued.certificates) == 1
    assert StateDir(tmp_path / "devices", guid).read_metadata()["enrollment"] == "live"
