"""`factory-svc enroll | enroll-batch | enrollment-status` from a shell, against a real service + emulator."""

from __future__ import annotations

import csv
import functools
import json
import os
import stat
import uuid

import pytest
from provisioning_env import dps_enrollment, factory_env, mint, running_factory
from support.cli_process import run_module

from provkit.activation_code import verify_code

pytestmark = pytest.mark.slow

_cli = functools.partial(run_module, "factory_svc.cli", timeout=120)


async def test_enroll_batch_with_progress_single_enroll_and_status(tmp_path, module_emulator):
    async with running_factory(factory_env(tmp_path, module_emulator)) as (app, stub):
        env = {**os.environ, "FACTORY_CLIENT_INSECURE": "true", "FACTORY_CLIENT_TARGET": app.grpc_address}
        folder = tmp_path / "certs"
        devices = [await mint(stub, str(uuid.uuid4()), folder) for _ in range(7)]
        stranger = str(uuid.uuid4())
        (folder / f"{stranger}.chain.pem").write_text(devices[0].chain_pem)  # its CN is another device's
        (folder / "zz-typo.chain.pem").write_text(devices[1].chain_pem)  # not a GUID
        codes_file = tmp_path / "codes.csv"
        code, out, err = await _cli(
            "enroll-batch", "--dir", str(folder), "--chunk", "3", "--codes-out", str(codes_file), env=env
        )
        assert code == 1, err  # two devices failed, each on its own
        assert "[3/9]" in err and "[9/9] enrolled 7, queued 0, failed 2" in err
        assert f"{stranger}: CERTIFICATE_SUBJECT_MISMATCH" in err
        assert "zz-typo: DEVICE_ID_NOT_A_GUID: the device id 'zz-typo' is not a GUID" in err
        assert stat.S_IMODE(codes_file.stat().st_mode) == 0o600
        rows = {r["device_id"]: r for r in csv.DictReader(codes_file.read_text().splitlines())}
        for device in devices:
            assert rows[device.device_id]["outcome"] == "CREATED"
            enrollment = await dps_enrollment(module_emulator, device.device_id)
            record = enrollment["optionalDeviceInformation"]["activationCode"]
            assert verify_code(rows[device.device_id]["activation_code"], record)

        single = await mint(stub, str(uuid.uuid4()), tmp_path / "one")
        code, out, err = await _cli("enroll", single.device_id, "--cert", str(single.cert_path), env=env)
        assert code == 0, err
        assert "CREATED" in out and "LIVE" in out
        first = next(line for line in out.splitlines() if line.startswith("code "))
        assert first.endswith("(new: print it on the label)")
        code, out, err = await _cli("enroll", single.device_id, "--cert", str(single.cert_path), env=env)
        assert code == 0 and "UNCHANGED" in out
        again = next(line for line in out.splitlines() if line.startswith("code "))
        # the same code again (kept until the labels are confirmed): never called "shown once" twice
        assert again.split()[1] == first.split()[1]
        assert again.endswith("(the code issued earlier, unchanged: a label printed with it stays right)")
        code, out, err = await _cli("enrollment-status", single.device_id, env=env)
        assert code == 0 and "LIVE" in out and "disabled" in out
        code, out, err = await _cli("enrollment-status", single.device_id, "--json", env=env)
        assert code == 0 and json.loads(out)["state"] == "LIVE"
        assert json.loads(out)["failure_reason"] is None and json.loads(out)["owner"] is None  # absent: null
        unknown = str(uuid.uuid4())
        code, out, err = await _cli("enrollment-status", unknown, env=env)
        assert (code, out) == (1, "")
        assert err == (  # not "state NOT_FOUND" with "owner (none yet: the first activation claims it)"
            f"factory-svc: error: the factory has no enrollment for device {unknown} [NOT_FOUND]\n"
            f"  enroll it: factory-svc enroll {unknown} --cert FILE\n"
        )
        code, out, err = await _cli("enroll", "bad id", "--cert", str(single.cert_path), env=env)
        assert code == 2 and err.startswith("factory-svc: error: the device id 'bad id' is not a GUID")
        code, out, err = await _cli("enroll", single.device_id, "--cert", str(tmp_path / "nope.pem"), env=env)
        assert (code, err) == (
            2,
            f"factory-svc: error: the certificate file {tmp_path / 'nope.pem'} does not exist\n",
        )


async def test_enroll_for_an_owner_transfer_it_and_see_it_in_the_status(tmp_path, module_emulator):
    async with running_factory(factory_env(tmp_path, module_emulator)) as (app, stub):
        env = {**os.environ, "FACTORY_CLIENT_INSECURE": "true", "FACTORY_CLIENT_TARGET": app.grpc_address}
        device = await mint(stub, str(uuid.uuid4()), tmp_path / "one")
        code, out, err = await _cli(
            "enroll", device.device_id, "--cert", str(device.cert_path), "--owner", "acme", env=env
        )
        assert code == 0, err
        code, out, err = await _cli("enrollment-status", device.device_id, env=env)
        assert code == 0 and "owner       acme" in out
        code, out, err = await _cli(
            "transfer-owner", device.device_id, "--to", "globex", "--reason", "order 12 resold", env=env
        )
        assert code == 0, err
        assert "acme -> globex" in out
        code, out, err = await _cli("enrollment-status", device.device_id, env=env)
        assert "owner       globex" in out
        code, out, err = await _cli(
            "transfer-owner", device.device_id, "--to", "Globex!", "--reason", "x", env=env
        )
        assert (
            code == 1 and err.startswith("factory-svc: error: ") and err.rstrip().endswith("[OWNER_INVALID]")
        )
    enrollment = await dps_enrollment(module_emulator, device.device_id)
    assert enrollment["optionalDeviceInformation"]["owner"] == {"oem": "globex"}
