"""``iot-emulator serve`` as a user runs it: settings file + flags, connection.json, ready file, what it
prints (never a key), refusals of bad settings, graceful SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from conftest import free_loopback_address
from support.waiting import exited, until_sync

from azure_iot_emulator.config import build_config
from mainkit.settings import SettingsError

pytestmark = pytest.mark.slow


def _serve(args, tmp_path):
    log = (tmp_path / "serve.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "azure_iot_emulator", "serve", *args], stdout=log, stderr=subprocess.STDOUT
    )


def test_settings_file_flags_connection_file_ready_file_and_sigterm(tmp_path):
    dps, hub1, hub2 = (free_loopback_address() for _ in range(3))
    data = tmp_path / "data"
    config = tmp_path / "emulator.toml"
    config.write_text(
        f'data_dir = "{data}"\ndps_host = "{dps}"\nhub_hosts = ["{hub1}", "{hub2}"]\n'
    )
    ready = tmp_path / "ready"
    proc = _serve(["--config", str(config), "--hub-host", hub2, "--ready-file", str(ready)], tmp_path)
    try:
        log = (tmp_path / "serve.log").read_text
        until_sync(ready.exists, "the ready file", fail_if=exited(proc, lambda: f"the emulator:\n{log()}\n"))
        info = json.loads((data / "connection.json").read_text())
        assert info["pid"] == proc.pid
        assert info["global_endpoint"] == dps
        assert [h["host_name"] for h in info["hubs"]] == [hub2]  # the flag replaced the file's list
        assert info["default_hub"] == hub2
        assert info["id_scope"].startswith("0ne") and len(info["id_scope"]) == 11
        dps_cs = info["dps"]["connection_string"]
        # Azure's shape: the service REST APIs are on 443 of each host, so no port in HostName.
        assert dps_cs.startswith(f"HostName={dps};SharedAccessKeyName=provisioningserviceowner;")
        assert info["hubs"][0]["connection_string"].startswith(f"HostName={hub2};SharedAccessKeyName=")
        assert info["https_port"] == 443 and info["hubs"][0]["rest_endpoint"] == f"https://{hub2}"
        assert (data / "emulator-ca.pem").exists()
        assert (data / "emulator-ca.key").stat().st_mode & 0o777 == 0o600
        assert (data / "connection.json").stat().st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    out = (tmp_path / "serve.log").read_text()
    assert info["id_scope"] in out and "ready" in out
    assert dps_cs.split("SharedAccessKey=")[1] not in out  # keys never printed
    assert not (data / "connection.json").exists()


def test_bad_settings_exit_2_with_a_clear_message(tmp_path):
    host = free_loopback_address()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hub_hosts": [host], "colour": "blue"}))
    result = subprocess.run(
        [sys.executable, "-m", "azure_iot_emulator", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "unknown settings ['colour']" in result.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "azure_iot_emulator",
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--hub-host",
            host,
            "--hub-host",
            host,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "distinct" in result.stderr
    assert not (tmp_path / "d").exists()


def test_build_config_defaults():
    cfg = build_config(None, {})
    assert cfg.dps_host == "localhost" and cfg.hub_hosts == ("127.0.0.2", "127.0.0.3")
    assert (cfg.mqtt_port, cfg.https_port) == (8883, 443) and cfg.assignment_delay == 1.0


def test_assignment_delay_from_file_and_flag(tmp_path):
    settings = tmp_path / "s.toml"
    settings.write_text('assignment_delay = "immediate"\n')
    assert build_config(settings, {}).assignment_delay is None
    assert build_config(settings, {"assignment_delay": "2.5"}).assignment_delay == 2.5
    settings.write_text("assignment_delay = 0\n")
    assert build_config(settings, {}).assignment_delay == 0.0
    for bad in ("soon", "-1", "7200"):
        with pytest.raises(ValueError, match="assignment"):
            build_config(None, {"assignment_delay": bad})


def test_azure_quotas_and_hub_tier_from_file_and_flag(tmp_path):
    assert build_config(None, {}).azure_quotas is False
    settings = tmp_path / "s.toml"
    settings.write_text('azure_quotas = true\nhub_tier = "S2"\n')
    cfg = build_config(settings, {})
    assert cfg.azure_quotas is True and cfg.hub_tier == "S2"
    assert build_config(settings, {"hub_tier": "S3"}).hub_tier == "S3"
    settings.write_text('azure_quotas = "yes"\n')
    with pytest.raises(ValueError, match="true or false"):
        build_config(settings, {})
    with pytest.raises(ValueError, match="hub_tier"):
        build_config(None, {"hub_tier": "B1"})


def test_c2d_settings_from_file_environment_and_flag(tmp_path):
    cfg = build_config(None, {})
    assert (cfg.c2d_default_ttl, cfg.c2d_max_delivery_count) == (3600, 10)  # Azure's defaults
    settings = tmp_path / "emu.toml"
    settings.write_text("c2d_default_ttl = 60\nc2d_max_delivery_count = 3\n")
    cfg = build_config(settings, {}, env={"IOT_EMULATOR_C2D_MAX_DELIVERY_COUNT": "5"})
    assert (cfg.c2d_default_ttl, cfg.c2d_max_delivery_count) == (60, 5)
    assert build_config(settings, {"c2d_default_ttl": 120.0}).c2d_default_ttl == 120
    for key, bad in (("c2d_default_ttl", 0.5), ("c2d_default_ttl", 172801.0), ("c2d_max_delivery_count", 0),
                     ("c2d_max_delivery_count", 101)):
        with pytest.raises(ValueError, match=key):
            build_config(None, {key: bad})


def test_a_pause_log_pointed_at_another_file_is_refused_and_left_alone(tmp_path):
    """The log is appended to: pointed by mistake at the emulator's database (or any file that is not a
    pause log), serve must refuse before writing a byte to it."""
    database = tmp_path / "emulator.db"
    database.write_bytes(b"SQLite format 3\x00" + bytes(100))
    before = database.read_bytes()
    with pytest.raises(SettingsError, match="not a pause log"):
        build_config(None, {"pause_log": str(database)})
    with pytest.raises(SettingsError, match="not a regular file"):
        build_config(None, {"pause_log": str(tmp_path)})
    assert database.read_bytes() == before
    log = tmp_path / "pauses.jsonl"
    assert build_config(None, {"pause_log": str(log)}).pause_log == log  # not there yet
    log.write_text('{"t": 1.0, "kind": "stall", "ms": 25.0}\n')
    assert build_config(None, {"pause_log": str(log)}).pause_log == log  # an earlier run's: appended to
