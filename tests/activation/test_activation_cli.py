"""`activation-svc serve` as a real process (mTLS) against a real emulator, driven by the `activation-svc`
client commands a person would type; the code comes from a file, never from argv; SIGTERM stops it."""

from __future__ import annotations

import json
import uuid

import pytest
from enrollment.provisioning_env import (
    OemTls,
    activation_serve_process,
    dps_enrollment,
    factory_env,
    mint,
    running_factory,
)
from support.cli_process import run_module

from devprov.v1 import factory_service_pb2 as fpb

pytestmark = pytest.mark.slow


async def test_serve_activate_status_deactivate_from_a_shell(tmp_path, emulator):
    tls = OemTls.create(tmp_path / "tls")
    async with activation_serve_process(tmp_path, emulator, tls) as client_env:
        async with running_factory(factory_env(tmp_path, emulator)) as (_app, factory):
            device = await mint(factory, str(uuid.uuid4()), tmp_path / "devices")
            enrolled = await factory.Enroll(
                fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
            )
        code_file = tmp_path / "code.txt"
        code_file.write_text(enrolled.activation_code + "\n")
        meta = json.dumps({"tags": {"customer": "acme"}, "properties": {"desired": {"interval_s": 5}}})
        hub = emulator.hub_hosts[1]
        code, out, err = await run_module(
            "activation_svc.cli",
            "activate",
            device.device_id,
            "--code-file",
            str(code_file),
            "--metadata-json",
            meta,
            "--hub",
            hub,
            env=client_env,
        )
        assert code == 0, err
        assert out == (
            f"activated {device.device_id} on hub {hub}; "
            "the device will pick it up at its next registration; metadata replaced by the one sent.\n"
        )
        assert enrolled.activation_code not in out + err
        assert (await dps_enrollment(emulator, device.device_id))["provisioningStatus"] == "enabled"

        metadata_file = tmp_path / "meta.json"
        metadata_file.write_text(json.dumps({"tags": {"bad key": 1}}))
        code, out, err = await run_module(
            "activation_svc.cli",
            "activate",
            device.device_id,
            "--code-file",
            str(code_file),
            "--metadata",
            str(metadata_file),
            env=client_env,
        )
        # checked here, before anything is sent: one line naming the file (not the proto field)
        assert (code, err) == (
            2,
            f"activation-svc: error: the metadata in {metadata_file} is refused: tags.bad key: keys must not "
            "contain spaces [METADATA_INVALID]\n",
        )

        code, out, err = await run_module(
            "activation_svc.cli",
            "status",
            device.device_id,
            "--json",
            env={**client_env, "ACTIVATION_CLIENT_CODE": enrolled.activation_code},
        )
        assert code == 0, err
        assert json.loads(out)["lifecycle"] == "ACTIVATED"
        assert json.loads(out)["owner"] == "acme"  # the first activation claimed it for the caller's OEM
        assert json.loads(out)["deactivated"] is None  # absent: null, not ""

        # The owner asks without the code: its identity suffices.
        code, out, err = await run_module("activation_svc.cli", "status", device.device_id, env=client_env)
        assert code == 0, err
        assert "lifecycle" in out and "ACTIVATED" in out and "allocated hub" in out

        unknown = str(uuid.uuid4())
        code, out, err = await run_module(
            "activation_svc.cli", "status", unknown, "--code-file", str(code_file), env=client_env
        )
        # An unknown device and a wrong code get the same answer (nobody learns which ids exist).
        assert (code, out) == (1, "")
        assert err == "activation-svc: error: unknown device or wrong activation code [ACTIVATION_DENIED]\n"

        wrong = tmp_path / "wrong.txt"
        wrong.write_text("0000-0000-0000-0000")
        code, out, err = await run_module(
            "activation_svc.cli", "deactivate", device.device_id, "--code-file", str(wrong), env=client_env
        )
        assert code == 1 and "[ACTIVATION_DENIED]" in err
        code, out, err = await run_module(
            "activation_svc.cli",
            "deactivate",
            device.device_id,
            "--code-file",
            str(code_file),
            env=client_env,
        )
        assert code == 0, err
        assert out == (
            f"deactivated {device.device_id}: its enrollment is disabled "
            "(it had not registered with a hub).\n"
        )

        no_cert = {k: v for k, v in client_env.items() if not k.startswith("ACTIVATION_CLIENT_CERT")}
        no_cert.pop("ACTIVATION_CLIENT_KEY_FILE")
        code, out, err = await run_module(
            "activation_svc.cli", "status", device.device_id, "--code-file", str(code_file), env=no_cert
        )
        assert code in (1, 3) and ("UNAVAILABLE" in err or "UNAUTHENTICATED" in err), err
