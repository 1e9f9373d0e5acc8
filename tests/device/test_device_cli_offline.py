"""CLI behaviour that needs no cloud: clear messages and exit codes, never a traceback."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from support.certs import TestCa

from device_client.cli import main
from device_client.state import Assignment, StateDir

GUID = "0a1b2c3d-0000-4000-8000-00000000cafe"


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures the root logger for its process; undo that so later tests do not log into a
    closed capture stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def ca() -> TestCa:
    return TestCa()


def _provisioned(root, ca, **validity) -> StateDir:
    state = StateDir(root, GUID)
    key_pem, chain_pem = ca.identity(GUID, **validity)
    meta = {"guid": GUID, "key_origin": "device", "enrollment": "live"}
    state.write_identity(key_pem=key_pem, chain_pem=chain_pem, metadata=meta, force=False)
    return state


def run_cli(root, *args):
    return main(["--state-root", str(root), "--log-format", "text", *args])


def test_status_missing_state_dir(tmp_path, capsys):
    assert run_cli(tmp_path, "status", GUID) == 3
    err = capsys.readouterr().err
    assert "no state for device" in err and "STATE_DIR_MISSING" in err and "Traceback" not in err


def test_status_of_a_provisioned_device(tmp_path, capsys, ca):
    state = _provisioned(tmp_path, ca)
    state.write_assignment(Assignment("127.0.0.2", GUID, datetime.now(UTC), "0ne00000001"))
    assert run_cli(tmp_path, "status", GUID) == 0
    out = capsys.readouterr().out
    ident = state.load_identity().info
    assert ident.thumbprint_sha1 in out
    assert "hub 127.0.0.2" in out
    assert "0 buffered" in out
    assert run_cli(tmp_path, "status", GUID, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identity"]["serial"] == ident.serial_hex
    assert report["identity"]["expired"] is False
    assert report["assignment"]["assigned_hub"] == "127.0.0.2"
    assert report["telemetry"]["pending"] == 0


def test_status_shows_expired_and_run_refuses(tmp_path, capsys, ca):
    now = datetime.now(UTC)
    _provisioned(tmp_path, ca, not_before=now - timedelta(days=3), not_after=now - timedelta(days=1))
    assert run_cli(tmp_path, "status", GUID) == 0
    assert "EXPIRED" in capsys.readouterr().out
    assert run_cli(tmp_path, "run", GUID, "--id-scope", "0ne00000001") == 4
    err = capsys.readouterr().err
    assert "CERTIFICATE_EXPIRED" in err and "Traceback" not in err


def test_run_with_key_not_matching_certificate(tmp_path, capsys, ca):
    state = _provisioned(tmp_path, ca)
    other_key, _ = ca.identity(GUID)
    state.key_path.write_bytes(other_key)
    assert run_cli(tmp_path, "run", GUID, "--id-scope", "0ne00000001") == 4
    assert "KEY_CERTIFICATE_MISMATCH" in capsys.readouterr().err


def test_run_with_corrupted_state(tmp_path, capsys, ca):
    state = _provisioned(tmp_path, ca)
    state.chain_path.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    assert run_cli(tmp_path, "run", GUID, "--id-scope", "0ne00000001") == 3
    assert "STATE_CORRUPTED" in capsys.readouterr().err


def test_run_without_id_scope(tmp_path, capsys, ca, monkeypatch):
    monkeypatch.delenv("DEVICE_CLIENT_ID_SCOPE", raising=False)
    _provisioned(tmp_path, ca)
    assert run_cli(tmp_path, "run", GUID) == 8
    assert "ID_SCOPE_MISSING" in capsys.readouterr().err


def test_run_with_unreadable_trusted_ca(tmp_path, capsys, ca):
    _provisioned(tmp_path, ca)
    missing = str(tmp_path / "nope.pem")
    code = run_cli(tmp_path, "run", GUID, "--id-scope", "0ne1", "--trusted-ca-file", missing)
    assert code == 8
    assert "TRUSTED_CA_UNREADABLE" in capsys.readouterr().err


def test_invalid_guid_is_a_usage_error(tmp_path, capsys):
    assert run_cli(tmp_path, "status", "not/a/guid") == 2
    assert "[DEVICE_ID_NOT_A_GUID]" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_client",
            "--state-root",
            str(tmp_path),
            "run",
            GUID,
            "--id-scope",
            "0ne1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert "STATE_DIR_MISSING" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_run_with_unreachable_dps_gives_up_when_told(tmp_path, capsys, ca):
    from conftest import free_loopback_address

    _provisioned(tmp_path, ca)
    nobody = free_loopback_address()  # nothing listens on 8883 there
    code = run_cli(
        tmp_path,
        "run",
        GUID,
        "--id-scope",
        "0ne00000001",
        "--global-endpoint",
        nobody,
        "--give-up-after",
        "1",
    )
    err = capsys.readouterr().err
    assert code == 7
    assert "CLOUD_UNAVAILABLE" in err and "DPS" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "either --devices N or --existing"),
        (["--devices", "3", "--existing"], "either --devices N or --existing"),
        (["--devices", "0"], "at least 1"),
        (["--existing"], "no device state directories"),
    ],
)
def test_simulate_refuses_unclear_requests_with_a_usage_error(tmp_path, capsys, args, message):
    assert main(["--state-root", str(tmp_path / "none"), "simulate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
