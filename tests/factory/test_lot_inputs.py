"""The lot commands' inputs (`factory-svc lot`, `labels`, `enroll-batch --lot`, `lot-status`), run in this
process through `factory_svc.cli.main` against a factory that is not there: a wrong directory, files that
are not text, are refused with one line and exit 2, before anything is written or sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory_svc import cli
from factory_svc.lots.manifest import DeviceEntry, Enrolled, LotManifest, now_text

NOWHERE = "127.0.0.1:1"  # nothing listens: a command that got as far as a call would say so
DEVICE = "3f2a9c1e-0000-4000-8000-000000000001"


@pytest.fixture(autouse=True)
def _client_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACTORY_CLIENT_INSECURE", "true")
    monkeypatch.setenv("FACTORY_CLIENT_TARGET", NOWHERE)


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "command",
    [
        ["labels", "{lot}", "--portal-url", "https://activate.example.com"],
        ["enroll-batch", "--lot", "{lot}"],
        ["lot-status", "{lot}", "--no-cloud"],
    ],
    ids=lambda command: command[0],
)
@pytest.mark.parametrize("exists", [False, True], ids=["missing", "not-a-lot"])
def test_a_command_on_a_lot_refuses_a_directory_that_holds_none_and_writes_nothing_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], exists: bool
) -> None:
    lot = tmp_path / "typo"
    if exists:
        lot.mkdir()
    code = cli.main([part.format(lot=lot) for part in command])
    assert code == 2
    assert f"{lot} is not a lot directory" in capsys.readouterr().err
    assert lot.is_dir() is exists
    assert _tree(tmp_path) == (["typo"] if exists else [])  # no directory made, no lock file left


@pytest.mark.parametrize(
    ("option", "name", "what"),
    [("--csr-dir", "csrs/a.csr", "CSR file"), ("--ids", "ids.txt", "device id file")],
    ids=["csr-dir", "ids"],
)
def test_a_lot_whose_input_file_is_not_text_is_refused_before_its_directory_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, name: str, what: str
) -> None:
    bad = tmp_path / name
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"\xff\xfe-----BEGIN CERTIFICATE REQUEST-----\n")
    out = tmp_path / "lot"
    given = bad.parent if option == "--csr-dir" else bad
    code = cli.main(["lot", "LOT-1", option, str(given), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"the {what} {bad} is not text (UTF-8)" in err and "[BUG]" not in err
    assert not out.exists()


def test_lot_status_prints_the_manifest_as_json_and_exits_3_saying_why_when_the_factory_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lot = tmp_path / "lot"
    lot.mkdir(mode=0o700)
    manifest = LotManifest(lot, "LOT-1", "server", 1)
    manifest.devices[0] = DeviceEntry(
        0, DEVICE, "0A", {"chain": f"{DEVICE}/chain.pem"}, now_text(), Enrolled(now_text(), "CREATED", "LIVE")
    )
    manifest.save()
    code = cli.main(["lot-status", str(lot), "--json", "--timeout", "5"])
    out, err = capsys.readouterr()
    assert code == 3, err  # the factory answered for no device: as any command whose service is unreachable
    status = json.loads(out)  # the whole of standard output: what the manifest says
    assert status["devices"][0]["cloud_error"].startswith("UNAVAILABLE")
    assert f"cannot reach the factory at {NOWHERE} as configured: nothing accepts connections" in err
    assert cli.main(["lot-status", str(lot), "--no-cloud"]) == 0  # not asked: nothing missing
