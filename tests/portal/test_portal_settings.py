"""The portal's settings: unsafe ones refused before anything binds; the hub list from the activation
service's own cloud settings."""

from __future__ import annotations

import pytest

from activation_svc.cli import main
from activation_svc.portal.app import create_app
from activation_svc.portal.settings import PortalSettings, load_portal_settings, parse_listen
from provkit.channels import ChannelSecurity
from provkit.settings import SettingsError


def test_listen_addresses():
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8443") == ("::1", 8443)
    assert parse_listen(":8080") == ("127.0.0.1", 8080)
    for bad in ("8080", "host:http", "127.0.0.1:70000"):
        with pytest.raises(SettingsError):
            parse_listen(bad)


def test_unsafe_settings_are_refused_before_binding(tmp_path, capsys):
    base = PortalSettings(security=ChannelSecurity(insecure=True))
    with pytest.raises(SettingsError, match="loopback only"):
        PortalSettings(security=base.security, host="0.0.0.0").check()
    PortalSettings(security=base.security, host="0.0.0.0", allow_non_loopback=True).check()  # explicit
    with pytest.raises(SettingsError, match="plaintext channel"):
        PortalSettings(security=base.security, target="10.1.2.3:50052").check()
    with pytest.raises(SettingsError, match="go together"):
        PortalSettings(security=base.security, tls_cert_file=tmp_path / "c.pem").check()
    with pytest.raises(SettingsError, match="loopback only"):
        create_app(PortalSettings(security=base.security, host="192.0.2.1"))

    assert main(["portal", "--listen", "0.0.0.0:0", "--insecure"]) == 2
    assert "loopback only" in capsys.readouterr().err
    assert main(["portal", "--insecure", "--target", "192.0.2.1:50052"]) == 2
    assert "plaintext channel" in capsys.readouterr().err
    assert main(["portal", "--listen", "nonsense"]) == 2


def test_settings_from_the_environment_and_the_shared_toml_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .iot-emulator here: the cloud is not configured
    settings = load_portal_settings(env={"ACTIVATION_PORTAL_INSECURE": "true"})
    assert settings.hubs.names == () and settings.hubs.default is None
    assert (settings.host, settings.port, settings.target) == ("127.0.0.1", 8080, "127.0.0.1:50052")

    # the activation service's own [cloud] block (secrets in files, as provkit.settings wants them)
    (tmp_path / "dps.secret").write_text("HostName=dps.example;SharedAccessKeyName=a;SharedAccessKey=a2V5")
    (tmp_path / "hubs.secret").write_text(
        "HostName=hub-a.example;SharedAccessKeyName=o;SharedAccessKey=a2V5\n"
        "HostName=hub-b.example;SharedAccessKeyName=o;SharedAccessKey=a2V5\n"
    )
    config = tmp_path / "activation.toml"
    config.write_text(
        "[portal]\nport = 0\ninsecure = true\ntarget = '127.0.0.1:6000'\nmax_body_bytes = 4096\n"
        "[cloud]\ndps_connection_string_file = 'dps.secret'\nhub_connection_strings_file = 'hubs.secret'\n"
        "default_hub = 'hub-b.example'\n"
    )
    settings = load_portal_settings(env={"ACTIVATION_CONFIG": str(config)})
    assert settings.hubs.names == ("hub-a.example", "hub-b.example")
    assert settings.hubs.default == "hub-b.example"
    assert (settings.port, settings.target, settings.max_body_bytes) == (0, "127.0.0.1:6000", 4096)
    assert "SharedAccessKey" not in repr(settings)  # only the hub names are kept
    env = {"ACTIVATION_PORTAL_CONFIG": str(config), "ACTIVATION_PORTAL_PORT": "9000"}
    assert load_portal_settings(env=env).port == 9000  # the environment wins


def test_the_limits_are_shared_through_the_services_database_only_when_it_is_postgresql(tmp_path):
    base = {"ACTIVATION_PORTAL_INSECURE": "true"}
    assert load_portal_settings(env=base).limits_database is None  # in this process
    sqlite = {**base, "ACTIVATION_DATABASE_URL": f"sqlite:///{tmp_path}"}
    assert load_portal_settings(env=sqlite).limits_database is None  # one process beside one service
    url = "postgresql://activation:secret@db.example:5432/activation"
    shared = load_portal_settings(env={**base, "ACTIVATION_DATABASE_URL": url}).limits_database
    assert shared is not None and "secret" not in shared.redacted()
    with pytest.raises(SettingsError, match="ACTIVATION_DATABASE_URL"):
        load_portal_settings(env={**base, "ACTIVATION_DATABASE_URL": "mysql://x/y"})
