"""The production line with real processes: `factory-svc lot --count 20 --enroll` against a factory pointed at
the emulator, killed with SIGKILL halfway through minting (``lot.item_written``) and again halfway through
enrolling (``enroll_batch.answered``: a chunk answered, its codes not on disk), resumed by running the same
command to one complete, consistent manifest with each device enrolled once; `lot-status` before and after a
device is activated, registers and sends telemetry; `enroll-batch --dir` on a lot directory."""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import stat
from collections import Counter

import pytest
from enrollment.provisioning_env import (
    DeviceFiles,
    dps_enrollment,
    dps_enrollment_list,
    factory_env,
    hub_session,
    register,
    running_factory,
)
from support.cli_process import run_module

from factory_svc.enrollment.codes_file import read_codes
from factory_svc.lots.service import derived_device_id
from provkit.activation_code import verify_code
from provkit.faults import CRASH_ENV

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(300)]

_cli = functools.partial(run_module, "factory_svc.cli", timeout=180)
LOT = "LINE-7-NIGHT"


def _rows(codes) -> list[dict[str, str]]:
    return list(csv.DictReader(codes.read_text().splitlines()))


async def _enable(emulator, device_id: str) -> None:
    """What activation does to DPS, done here with Microsoft's service SDK: the enrollment enabled."""
    from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient

    async with DeviceProvisioningClient.from_connection_string(
        emulator.dps_connection_string, connection_verify=str(emulator.ca_path)
    ) as client:
        enrollment = await client.enrollment.get(id=device_id)
        enrollment["provisioningStatus"] = "enabled"
        await client.enrollment.create_or_update(
            id=device_id, enrollment=enrollment, if_match=enrollment["etag"]
        )


async def test_a_lot_killed_while_minting_and_while_enrolling_resumes_to_one_consistent_manifest(
    tmp_path, module_emulator
):
    async with running_factory(factory_env(tmp_path, module_emulator)) as (app, _stub):
        env = {**os.environ, "FACTORY_CLIENT_INSECURE": "true", "FACTORY_CLIENT_TARGET": app.grpc_address}
        lot = tmp_path / "lot"
        command = (
            "lot",
            LOT,
            "--count",
            "20",
            "--out",
            str(lot),
            "--enroll",
            "--chunk",
            "5",
            "--owner",
            "acme",
        )
        devices = [derived_device_id(LOT, i) for i in range(20)]

        code, _out, err = await _cli(*command, env={**env, CRASH_ENV: "lot.item_written@10"})
        assert code == -signal.SIGKILL, err
        assert len(list(lot.glob("*/key.pem"))) == 10  # ten devices' files, then the power cut
        assert json.loads((lot / "manifest.json").read_text())["lot_id"] == LOT
        assert not (lot / "codes.csv").exists()

        code, _out, err = await _cli(*command, env={**env, CRASH_ENV: "enroll_batch.answered@3"})
        assert code == -signal.SIGKILL, err
        assert len(read_codes(lot / "codes.csv")) == 10  # two chunks on disk; the third answered, not written

        code, out, err = await _cli(*command, env=env)
        assert code == 0, err
        assert "20 of 20 enrolled (10 sent now)" in out
        assert not any(c in out or c in err for c in read_codes(lot / "codes.csv").values())

        # the manifest: every device once, minted with its files, enrolled; 0600 in a 0700 directory
        manifest = json.loads((lot / "manifest.json").read_text())
        assert (manifest["format"], manifest["version"], manifest["item_count"]) == (
            "devprov-lot-manifest",
            1,
            20,
        )
        assert stat.S_IMODE((lot / "manifest.json").stat().st_mode) == 0o600
        assert stat.S_IMODE(lot.stat().st_mode) == 0o700
        entries = manifest["devices"]
        assert [e["index"] for e in entries] == list(range(20))
        assert [e["device_id"] for e in entries] == devices
        assert {e["state"] for e in entries} == {"enrolled"} and {e["error"] for e in entries} == {""}
        assert len({e["serial"] for e in entries}) == 20
        for entry in entries:
            assert sorted(entry["files"]) == ["cert", "chain", "key"]
            assert all((lot / path).is_file() for path in entry["files"].values())
            assert entry["enrolled"]["owner"] == "acme" and entry["enrolled"]["delivery"] == "LIVE"

        # each device enrolled once: one DPS enrollment, one code in the file, and it opens that enrollment;
        # the chunk whose answer was lost came back UNCHANGED with its retained codes, not enrolled again
        rows = _rows(lot / "codes.csv")
        with_code = Counter(r["device_id"] for r in rows if r["activation_code"])
        assert with_code == Counter({device_id: 1 for device_id in devices})
        outcomes = {r["device_id"]: r["outcome"] for r in rows}
        assert [outcomes[d] for d in devices] == ["CREATED"] * 10 + ["UNCHANGED"] * 5 + ["CREATED"] * 5
        assert [e["enrolled"]["outcome"] for e in entries] == [outcomes[d] for d in devices]
        codes = read_codes(lot / "codes.csv")
        for device_id in devices:
            enrollment = await dps_enrollment(module_emulator, device_id)
            assert enrollment["provisioningStatus"] == "disabled"
            assert verify_code(codes[device_id], enrollment["optionalDeviceInformation"]["activationCode"])
        in_dps = [e["registrationId"] for e in await dps_enrollment_list(module_emulator)]
        assert sorted(d for d in in_dps if d in devices) == sorted(devices)

        # nothing left to do: a re-run sends nothing
        code, out, err = await _cli("enroll-batch", "--lot", str(lot), env=env)
        assert code == 0 and "(0 sent now)" in out, err

        code, out, err = await _cli("lot-status", str(lot), "--json", env=env)
        assert code == 0, err
        status = json.loads(out)
        assert status["counts"] == {
            "devices": 20, "minted": 20, "enrolled": 20, "code_printed": 0, "activated": 0, "registered": 0,
            "seen": 0,
        }  # fmt: skip
        assert {d["code"] for d in status["devices"]} == {"no"}

        # one device printed, activated, registered and heard from
        code, out, err = await _cli(
            "labels", str(lot), "--portal-url", "https://activate.example.com", "--mark-printed", env=env
        )
        assert code == 0, err
        first = devices[0]
        await _enable(module_emulator, first)
        files = DeviceFiles(first, (lot / first / "chain.pem").read_text(), lot / first / "chain.pem",
                            lot / first / "key.pem", "")  # fmt: skip
        registration = await register(module_emulator, files)
        assert registration.status == "assigned"
        hub = registration.registration_state.assigned_hub
        async with hub_session(module_emulator, files, hub) as client:
            await client.send_message('{"temperature": 21.5}')

        code, out, err = await _cli("lot-status", str(lot), "--json", env=env)
        assert code == 0, err
        status = json.loads(out)
        assert status["counts"] == {
            "devices": 20, "minted": 20, "enrolled": 20, "code_printed": 20, "activated": 1, "registered": 1,
            "seen": 1,
        }  # fmt: skip
        row = status["devices"][0]
        assert row["activated"] is True and row["registration"]["status"] == "assigned"
        assert row["registration"]["hub"] == hub and row["registration"]["updated"].endswith("Z")
        assert row["last_activity"].endswith("Z") and row["code"] == "printed"
        assert status["devices"][1]["activated"] is False and status["devices"][1]["last_activity"] is None

        code, out, err = await _cli("lot-status", str(lot), env=env)
        assert code == 0, err
        assert f"lot {LOT}: 20/20 minted, 20 enrolled, 20 code printed, 1 activated, 1 registered" in out
        line = next(line for line in out.splitlines() if line.startswith(first))
        assert "CREATED" in line and "printed" in line and "yes" in line and hub in line


async def test_enroll_batch_takes_a_lot_directory_by_dir_and_a_lot_file_by_its_directory_name(
    tmp_path, module_emulator
):
    async with running_factory(factory_env(tmp_path, module_emulator)) as (app, _stub):
        env = {**os.environ, "FACTORY_CLIENT_INSECURE": "true", "FACTORY_CLIENT_TARGET": app.grpc_address}
        lot = tmp_path / "lot"
        code, _out, err = await _cli("lot", "LINE-8", "--count", "3", "--out", str(lot), env=env)
        assert code == 0, err
        devices = [derived_device_id("LINE-8", i) for i in range(3)]

        code, _out, err = await _cli(
            "enroll-batch", "--dir", str(lot), "--codes-out", str(tmp_path / "c.csv"), env=env
        )
        assert code == 0, err
        assert sorted(read_codes(tmp_path / "c.csv")) == sorted(devices)

        one = lot / devices[0] / "chain.pem"  # the id is the directory's name, not "chain"
        code, _out, err = await _cli(
            "enroll-batch", str(one), "--codes-out", str(tmp_path / "c.csv"), env=env
        )
        assert code == 0, err
        assert [(r["device_id"], r["outcome"]) for r in _rows(tmp_path / "c.csv")[3:]] == [
            (devices[0], "UNCHANGED")
        ]

        empty = tmp_path / "empty"
        empty.mkdir()
        code, _out, err = await _cli(
            "enroll-batch", "--dir", str(empty), "--codes-out", str(tmp_path / "e.csv"), env=env
        )
        assert code == 2 and f"--dir {empty} holds no certificates" in err

        code, _out, err = await _cli("enroll-batch", "--lot", str(empty), env=env)
        assert code == 2 and "is not a lot directory" in err
