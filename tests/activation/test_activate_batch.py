"""`activation-svc activate-batch`: a shipment CSV activated through activation_svc (mTLS, the OEM's
template) by the real command as its own process; killed with SIGKILL halfway (crash point
``batch.answered``: an answer received, its result not yet written) and run again: every device ends
activated, each written to DPS once (one activation intent per device in the audit database), and the rows
the first run finished are answered from it (``replayed``), not done again."""

from __future__ import annotations

import json
import signal
from collections import Counter

import pytest
import pytest_asyncio
from enrollment.provisioning_env import (
    OemTls,
    activation_client_env,
    activation_env,
    dps_enrollment,
    factory_env,
    running_activation,
    running_factory,
)
from support.cli_process import run_module
from support.shipment import TEMPLATE, enroll_shipment, shipment_csv

from activation_svc.batch.shipment import read_results

pytestmark = pytest.mark.slow  # services, an emulator, 200 devices, real processes

DEVICES = 200


@pytest_asyncio.fixture
async def oem(emulator, tmp_path):
    tls = OemTls.create(tmp_path / "oem-tls")
    template = tmp_path / "acme.schema.json"
    template.write_text(json.dumps(TEMPLATE))
    env = activation_env(tmp_path, emulator, tls, ACTIVATION_TEMPLATES=f"acme={template}")
    async with (
        running_factory(factory_env(tmp_path, emulator)) as (factory_app, factory),
        running_activation(env, tls) as (app, _),
    ):
        yield factory_app, factory, app, activation_client_env(app.grpc_address, tls)


async def intents_per_device(app) -> Counter[str]:
    rows = await app.audit.db.read(lambda tx: tx.fetchall("SELECT device_id FROM activation_intents", ()))
    return Counter(row[0] for row in rows)


async def test_a_shipment_killed_halfway_finishes_on_a_rerun_without_doing_anything_twice(
    oem, emulator, tmp_path
):
    factory_app, factory, app, env = oem
    devices = await enroll_shipment(factory_app, factory, DEVICES)
    shipment = tmp_path / "shipment.csv"
    shipment.write_text(shipment_csv(devices, hub=emulator.hub_hosts[1]))
    results = tmp_path / "results.csv"
    args = ("activate-batch", str(shipment), "--results", str(results), "--concurrency", "4")

    killed = {**env, "DEVPROV_CRASH_AT": "batch.answered@90"}
    code, _, err = await run_module("activation_svc.cli", *args, env=killed, timeout=240)
    assert code == -signal.SIGKILL, err
    first = read_results(results.read_text())
    assert 0 < len(first) < DEVICES and all(r["outcome"] == "activated" for r in first)

    code, _, err = await run_module("activation_svc.cli", *args, env=env, timeout=240)
    assert code == 0, err
    second = read_results(results.read_text())
    assert sorted(r["device_id"] for r in second) == sorted(d for d, _ in devices)
    outcomes = Counter(r["outcome"] for r in second)
    # the rows in flight when the command died: the service finished them (or the re-run did), without
    # the answer reaching the result file; the re-run finds them active
    assert set(outcomes) <= {"activated", "already active"} and outcomes["already active"] < 4
    by_device = {r["device_id"]: r for r in second}
    assert all(by_device[r["device_id"]]["replayed"] == "yes" for r in first)  # answered, not done again
    assert f"{DEVICES} of {DEVICES} rows: {outcomes['activated']} activated" in err

    assert await intents_per_device(app) == Counter({d: 1 for d, _ in devices})  # one DPS write each
    entries = await app.audit.entries()
    ok = Counter(e.device_id for e in entries if e.action == "activate" and e.outcome == "ok")
    assert set(ok) == {d for d, _ in devices}
    device_id, _ = devices[7]
    enrollment = await dps_enrollment(emulator, device_id)
    assert enrollment["provisioningStatus"] == "enabled"
    assert enrollment["initialTwin"]["tags"]["chassisNumber"] == "VX200-20260008"
    assert enrollment["initialTwin"]["properties"]["desired"]["maxTemperature"] == 67  # typed: a number
    assert enrollment["initialTwin"]["properties"]["desired"]["ecoMode"] is True


async def test_a_template_violation_is_refused_per_row_naming_the_field(oem, emulator, tmp_path):
    factory_app, factory, _, env = oem
    devices = await enroll_shipment(factory_app, factory, 3)
    shipment = tmp_path / "shipment.csv"
    bad = {1: {"desired.telemetryIntervalSeconds": "0"}, 2: {"tags.machineModel": "VX-999"}}
    shipment.write_text(shipment_csv(devices, fields=bad))
    results = tmp_path / "results.csv"
    code, _, err = await run_module(
        "activation_svc.cli", "activate-batch", str(shipment), "--results", str(results), env=env, timeout=120
    )
    assert code == 1, err
    rows = {r["device_id"]: r for r in read_results(results.read_text())}
    assert rows[devices[0][0]]["outcome"] == "activated"
    for index, field in (
        (1, "metadata_json.properties.desired.telemetryIntervalSeconds"),
        (2, "metadata_json.tags.machineModel"),
    ):
        row = rows[devices[index][0]]
        assert (row["outcome"], row["reason"], row["field"]) == (
            "refused",
            "METADATA_TEMPLATE_VIOLATION",
            field,
        )
        assert (await dps_enrollment(emulator, devices[index][0]))["provisioningStatus"] == "disabled"
    assert "1 of 3" not in err and "1 activated, 2 refused" in err
    assert all(code not in results.read_text() for _, code in devices)  # codes never in the results


async def test_unusable_shipments_are_refused_before_anything_is_sent(oem, tmp_path):
    *_, env = oem
    cases = {
        "typo.csv": (
            "guid,code,tags.chasisNumber\nx,y,z\n",
            "'tags.chasisNumber' is not a field of the OEM's template",
        ),
        "nocode.csv": ("guid,hub\nx,y\n", "needs a 'guid' and a 'code' column"),
    }
    for name, (text, words) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        code, _, err = await run_module(
            "activation_svc.cli", "activate-batch", str(path), env=env, timeout=60
        )
        assert code == 2 and words in err, err
        assert not (tmp_path / f"{name}.results.csv").exists()
    meta = tmp_path / "meta.json"
    meta.write_text('{"tags": {"a": 1, "a": 2}}')
    path = tmp_path / "with-meta.csv"
    path.write_text("guid,code\n3f2a9c1e-0000-4000-8000-000000000001,x\n")
    code, _, err = await run_module(
        "activation_svc.cli", "activate-batch", str(path), "--metadata", str(meta), env=env, timeout=60
    )
    assert code == 2 and "DUPLICATE_KEY" in err, err
