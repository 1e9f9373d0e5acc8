"""Cloud settings: the emulator's connection.json by default, explicit connection strings for real Azure."""

from __future__ import annotations

import json

import pytest

from provkit.cloud import CloudNotConfigured, load_cloud_settings
from provkit.settings import SettingsError, SettingsSource

DPS = "HostName=localhost;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=ZHBz"
HUB_A = "HostName=127.0.0.2;SharedAccessKeyName=iothubowner;SharedAccessKey=YQ=="
HUB_B = "HostName=127.0.0.3;SharedAccessKeyName=iothubowner;SharedAccessKey=Yg=="


def connection_json(path, **overrides):
    data = {
        "pid": 1,
        "ca_pem_path": str(path.parent / "emulator-ca.pem"),
        "id_scope": "0ne00000AB",
        "global_endpoint": "localhost",
        "dps": {"connection_string": DPS, "rest_endpoint": "https://localhost"},
        "hubs": [
            {"host_name": "127.0.0.2", "connection_string": HUB_A, "rest_endpoint": "https://127.0.0.2"},
            {"host_name": "127.0.0.3", "connection_string": HUB_B, "rest_endpoint": "https://127.0.0.3"},
        ],
        "default_hub": "127.0.0.2",
        **overrides,
    }
    path.write_text(json.dumps(data))
    return path


def test_from_the_emulator_file(tmp_path):
    path = connection_json(tmp_path / "connection.json")
    cloud = load_cloud_settings(SettingsSource("X", env={"X_CLOUD_EMULATOR_CONNECTION_FILE": str(path)}))
    assert cloud.dps.connection_string.reveal() == DPS and "ZHBz" not in repr(cloud)
    assert cloud.dps.ca_file == tmp_path / "emulator-ca.pem" and cloud.dps.host_name == "localhost"
    assert cloud.hub_names == ("127.0.0.2", "127.0.0.3") and cloud.default_hub == "127.0.0.2"
    assert cloud.id_scope == "0ne00000AB" and cloud.hub("127.0.0.3").connection_string.reveal() == HUB_B


def test_explicit_values_win_and_real_azure_needs_no_file(tmp_path):
    env = {
        "X_CLOUD_DPS_CONNECTION_STRING": DPS,
        "X_CLOUD_HUB_CONNECTION_STRINGS": f"{HUB_A},{HUB_B}",
        "X_CLOUD_DEFAULT_HUB": "127.0.0.3",
    }
    cloud = load_cloud_settings(SettingsSource("X", env=env))
    assert cloud.hub_names == ("127.0.0.2", "127.0.0.3") and cloud.default_hub == "127.0.0.3"
    assert cloud.dps.ca_file is None and cloud.source == "explicit"
    path = connection_json(tmp_path / "connection.json")
    cloud = load_cloud_settings(
        SettingsSource(
            "X", env={"X_CLOUD_EMULATOR_CONNECTION_FILE": str(path), "X_CLOUD_DEFAULT_HUB": "127.0.0.3"}
        )
    )
    assert cloud.default_hub == "127.0.0.3"


def test_errors_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CloudNotConfigured, match="X_CLOUD_DPS_CONNECTION_STRING"):
        load_cloud_settings(SettingsSource("X", env={}))
    with pytest.raises(SettingsError, match="cannot read"):
        load_cloud_settings(
            SettingsSource("X", env={"X_CLOUD_EMULATOR_CONNECTION_FILE": str(tmp_path / "nope")})
        )
    path = connection_json(tmp_path / "connection.json")
    with pytest.raises(SettingsError, match="default hub"):
        load_cloud_settings(
            SettingsSource(
                "X", env={"X_CLOUD_EMULATOR_CONNECTION_FILE": str(path), "X_CLOUD_DEFAULT_HUB": "elsewhere"}
            )
        )
    with pytest.raises(SettingsError, match="not an emulator connection file"):
        load_cloud_settings(
            SettingsSource(
                "X",
                env={"X_CLOUD_EMULATOR_CONNECTION_FILE": str(connection_json(tmp_path / "b.json", dps=None))},
            )
        )
