"""Every hostile CSV (tests/support/hostile_csv.py) against every entry point that reads one of its kind.

Shipments (``SHAPES``): ``activation-svc activate-batch`` (the real command as its own process, mTLS to
activation_svc) and the portal's ``/batch`` upload (aiohttp, CSRF token and all), both in front of one real
activation_svc with the OEM's template.  Each refuses the file as a whole, naming what is wrong; the device
in it stays disabled, its enrollment unwritten, and the command writes no result file.

Codes files (``CODES_SHAPES``): the factory's commands that read one, in this process against a factory
that is not there (a command that got as far as a call would say so): a lot's ``codes.csv`` read by
``labels``, ``lot-status`` and ``enroll-batch --lot``, and the ``--codes-out`` file of ``enroll-batch`` and
``rotate-code``.  Each refuses with exit 2 and the words, before anything is sent or written: the codes file
and the manifest stay as they were, no label is made.

A new entry point is one more walker here; a new shape is one more line in its list.
"""

from __future__ import annotations

import html
import re
import uuid
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from enrollment.provisioning_env import activation_client_env
from portal.portal_env import hidden_fields, templated_portal
from support.cli_process import run_module
from support.hostile_csv import CODES_SHAPES, SHAPES, HostileCsv, shape_id

from factory_svc import cli as factory_cli
from factory_svc.lots.manifest import DeviceEntry, Enrolled, LotManifest, now_text
from provkit.activation_code import new_code


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def oem(module_emulator, tmp_path_factory):
    async with templated_portal(tmp_path_factory.mktemp("hostile-csv"), module_emulator) as (stack, client):
        device, code = await stack.enrolled()
        yield stack, client, device.device_id, code


async def unchanged(stack, device_id: str, before: dict) -> None:
    after = await stack.enrollment(device_id)
    assert after["etag"] == before["etag"] and after["provisioningStatus"] == "disabled"


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.slow  # the stack, a process per shape
async def test_activate_batch_refuses_the_file_before_anything_is_sent(
    oem, tmp_path, shape: HostileCsv
) -> None:
    stack, _, device_id, code = oem
    before = await stack.enrollment(device_id)
    shipment = tmp_path / "shipment.csv"
    shipment.write_bytes(shape.file(device_id, code))
    env = activation_client_env(stack.activation_app.grpc_address, stack.tls)
    status, _, err = await run_module("activation_svc.cli", "activate-batch", str(shipment), env=env)
    assert status == 2, err
    assert shape.words in err and "Traceback" not in err, err
    assert code not in err
    assert not (tmp_path / "shipment.csv.results.csv").exists()
    await unchanged(stack, device_id, before)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.slow  # the stack, a process per shape
async def test_the_portal_refuses_the_upload_before_anything_is_sent(oem, shape: HostileCsv) -> None:
    stack, client, device_id, code = oem
    before = await stack.enrollment(device_id)
    page = await (await client.get("/batch")).text()
    form = aiohttp.FormData()
    form.add_field("csrf_token", hidden_fields(page)["csrf_token"])
    form.add_field("shipment", shape.file(device_id, code), filename="shipment.csv", content_type="text/csv")
    form.add_field("metadata", "")
    response = await client.post("/batch", data=form)
    page = await response.text()
    assert response.status == 400, page
    problem = re.search(r'id="problem"[^>]*>(.*?)</section>', page, re.S)
    assert problem is not None, page
    said = html.unescape(problem.group(1))
    assert "SHIPMENT_UNUSABLE" in said and shape.words in said, said
    assert code not in page
    await unchanged(stack, device_id, before)


# ------------------------------------------------------------------------------------------------ codes files
CODES_COMMANDS = {
    "labels": ["labels", "{lot}", "--portal-url", "https://activate.example.com", "--format", "zpl"],
    "lot-status": ["lot-status", "{lot}", "--no-cloud"],
    "enroll-batch-lot": ["enroll-batch", "--lot", "{lot}"],
    "enroll-batch-codes-out": ["enroll-batch", "{lot}/{guid}/chain.pem", "--codes-out", "{lot}/codes.csv"],
    "rotate-code-codes-out": ["rotate-code", "{guid}", "--codes-out", "{lot}/codes.csv"],
}


def _lot_with_codes(folder: Path, codes: bytes, device_id: str) -> None:
    """A lot as ``lot --enroll`` leaves it (one device, minted and enrolled), its codes file ``codes``."""
    folder.mkdir(mode=0o700)
    (folder / device_id).mkdir(mode=0o700)
    (folder / device_id / "chain.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    manifest = LotManifest(folder, "LOT-HOSTILE", "server", 1)
    manifest.devices[0] = DeviceEntry(
        0,
        device_id,
        "0A",
        {"chain": f"{device_id}/chain.pem"},
        now_text(),
        Enrolled(now_text(), "CREATED", "LIVE"),
    )
    manifest.save()
    (folder / "codes.csv").write_bytes(codes)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".lock"
    }


@pytest.mark.parametrize("command", CODES_COMMANDS.values(), ids=CODES_COMMANDS.keys())
@pytest.mark.parametrize("shape", CODES_SHAPES, ids=shape_id)
def test_a_factory_command_refuses_a_hostile_codes_file_before_anything_is_sent_or_written(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    shape: HostileCsv,
    command: list[str],
) -> None:
    monkeypatch.setenv("FACTORY_CLIENT_INSECURE", "true")
    monkeypatch.setenv("FACTORY_CLIENT_TARGET", "127.0.0.1:1")  # nothing listens there
    device_id, code = str(uuid.uuid4()), new_code()
    lot = tmp_path / "lot"
    _lot_with_codes(lot, shape.file(device_id, code), device_id)
    before = _files(lot)
    status = factory_cli.main([part.format(lot=lot, guid=device_id) for part in command])
    err = capsys.readouterr().err
    assert status == 2, err
    assert shape.words in err and "[BUG]" not in err and "Traceback" not in err, err
    assert code not in err
    assert _files(lot) == before  # the codes file and the manifest as they were, no label
