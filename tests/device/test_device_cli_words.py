"""What `device-client` says to a person, run as a real process: a typo'd or truncated GUID is refused
before anything is made, an unknown device is one sentence (no FAILED line, no traceback), and options are
never abbreviated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GUID = "3f2a9c1e-0000-4000-8000-000000000001"


def _device_client(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_CLIENT_")}
    environment.update(DEVICE_CLIENT_STATE_ROOT=str(tmp_path / "devices"), DEVICE_CLIENT_LOG_FORMAT="text")
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "device_client", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("raw", ["not-a-guid", GUID[:-1], GUID.replace("-", "")])
def test_provision_refuses_what_is_not_a_guid_and_makes_nothing(tmp_path: Path, raw: str) -> None:
    done = _device_client(tmp_path, "provision", raw, "--target", "127.0.0.1:9")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"device-client: error: the device id '{raw}' is not a GUID: expected 32 hex digits as 8-4-4-4-12, "
        f"like {GUID} [DEVICE_ID_NOT_A_GUID]\n"
    )
    assert not (tmp_path / "devices").exists()


def test_the_relaxed_setting_accepts_a_registration_id(tmp_path: Path) -> None:
    done = _device_client(tmp_path, "status", "Line-3.Press:7", DEVICE_CLIENT_DEVICE_IDS="registration-id")
    assert done.returncode == 3  # accepted as an id; there is just no such device here
    assert "'line-3.press:7'" in done.stderr and "not a GUID" not in done.stderr


@pytest.mark.parametrize("command", ["status", "run"])
def test_an_unknown_device_is_one_sentence_and_what_to_do_next(tmp_path: Path, command: str) -> None:
    extra = ("--id-scope", "0ne0001") if command == "run" else ()
    done = _device_client(tmp_path, command, GUID.upper(), *extra)
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr == (
        f"device-client: error: no state for device '{GUID}' in {tmp_path / 'devices'} [STATE_DIR_MISSING]\n"
        "  provisioned elsewhere? --state-root DIR (or DEVICE_CLIENT_STATE_ROOT)\n"
        f"  a new device: device-client provision {GUID}\n"
    )


def test_under_the_default_state_root_run_names_the_stack_settings_first(tmp_path: Path) -> None:
    """`make up` provisions under var/up/devices: `run` in a shell that never sourced var/up/env.sh looks in
    ./device-state, and must not just send the person to provision a device that has an identity."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_CLIENT_")}
    done = subprocess.run(
        [sys.executable, "-m", "device_client", "run", GUID, "--id-scope", "0ne0001"],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (3, "")
    lines = done.stderr.splitlines()
    assert lines[0] == (
        f"device-client: error: no state for device '{GUID}' in device-state [STATE_DIR_MISSING]"
    )
    assert lines[1] == "  running the stack of `make up`? `source var/up/env.sh` points every command at it"
    assert lines[-1] == f"  a new device: device-client provision {GUID}"


def test_options_are_never_abbreviated(tmp_path: Path) -> None:
    done = _device_client(tmp_path, "status", GUID, "--js")
    assert done.returncode == 2
    assert done.stderr.endswith("device-client: error: unrecognized arguments: --js\n")
