"""provkit settings (file + environment, secrets) and structured logs."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from provkit.context import Caller, bind_device_id, request_scope
from provkit.grpc_server import ClientAuth
from provkit.logging import configure_logging
from provkit.refusal_audit import RefusalAuditSettings
from provkit.settings import (
    FlagKeys,
    SettingsError,
    SettingsFile,
    SettingsSource,
    refusal_audit_settings,
    server_settings,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_environment_overrides_file_and_paths_resolve_against_the_file(tmp_path: Path) -> None:
    conf = _write(
        tmp_path / "svc.toml",
        '[server]\nhost = "127.0.0.2"\nport = 5000\ntls_cert_file = "tls/server.pem"\n'
        'tls_key_file = "tls/server.key"\nclient_ca_file = "tls/ca.pem"\n',
    )
    source = SettingsSource("SVC", env={"SVC_SERVER_PORT": "6001"}, file=conf)
    settings = server_settings(source, error_domain="svc")
    assert (settings.host, settings.port) == ("127.0.0.2", 6001)
    assert settings.tls is not None
    assert settings.tls.cert_file == tmp_path / "tls" / "server.pem"
    assert settings.tls.client_auth is ClientAuth.REQUIRE


def test_flags_over_environment_over_files_over_defaults(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.toml", 'port = 1\nhost = "from-base"\nname = "base"\nca = "ca.pem"\n')
    later = SettingsFile.read(_write(tmp_path / "later.toml", 'port = 2\nhost = "from-later"\n'))
    keys = FlagKeys({"listen": ("host", "port"), "switch": "switch"}, convert={"listen": str.split})

    class Args:
        listen = "flag-host 4"
        switch = False  # a switch not given

    source = SettingsSource(
        "SVC",
        env={"SVC_PORT": "3", "SVC_HOST": "", "SVC_SWITCH": "yes"},  # an empty variable is unset
        file=[SettingsFile.read(base), later],
        flags={"port": keys.values(Args())["port"]},
        defaults={"port": 5, "colour": "blue"},
    )
    assert source.integer("port", 0) == 4  # the flag
    assert source.text("host") == "from-later"  # the later file
    assert source.text("name") == "base" and source.text("colour") == "blue" and source.text("x") is None
    assert source.path("ca") == tmp_path / "ca.pem"  # relative to the file that names it
    assert source.flag("switch", False) is True  # the environment: the flag was not given
    assert keys.values(Args()) == {"host": "flag-host", "port": "4"}
    assert keys.within("portal").values(Args()) == {"portal.host": "flag-host", "portal.port": "4"}
    with pytest.raises(SettingsError, match="must be true or false"):  # a file has real booleans
        SettingsSource("SVC", env={}, file=_write(tmp_path / "b.toml", 'on = "yes"\n')).flag("on", False)
    with pytest.raises(SettingsError, match=r"unknown settings \['ca', 'host', 'name', 'port'\]"):
        SettingsFile.read(base, known=())


def test_bad_values_name_the_variable(tmp_path: Path) -> None:
    source = SettingsSource("SVC", env={"SVC_SERVER_PORT": "eighty", "SVC_SERVER_INSECURE": "maybe"})
    with pytest.raises(SettingsError, match="SVC_SERVER_PORT"):
        server_settings(source, error_domain="svc")
    with pytest.raises(SettingsError, match="SVC_SERVER_INSECURE"):
        source.flag("server.insecure", False)


def test_optional_client_auth_is_refused_with_its_reason(tmp_path: Path) -> None:
    """gRPC's Python server cannot ask for a certificate without requiring it: "optional" would quietly
    mean "never asked", and every party would be refused as anonymous."""
    env = {
        "SVC_SERVER_TLS_CERT_FILE": str(tmp_path / "server.pem"),
        "SVC_SERVER_TLS_KEY_FILE": str(tmp_path / "server.key"),
        "SVC_SERVER_CLIENT_CA_FILE": str(tmp_path / "ca.pem"),
        "SVC_SERVER_CLIENT_AUTH": "Optional",
    }
    with pytest.raises(SettingsError, match="SVC_SERVER_CLIENT_AUTH=optional cannot be served"):
        server_settings(SettingsSource("SVC", env=env), error_domain="svc")
    with pytest.raises(SettingsError, match="must be none or require, got 'sometimes'"):
        server_settings(
            SettingsSource("SVC", env={**env, "SVC_SERVER_CLIENT_AUTH": "sometimes"}), error_domain="svc"
        )
    settings = server_settings(
        SettingsSource("SVC", env={**env, "SVC_SERVER_CLIENT_AUTH": "none"}), error_domain="svc"
    )
    assert settings.tls is not None and settings.tls.client_auth is ClientAuth.NONE


def test_refusal_audit_settings_are_finite_and_positive() -> None:
    def read(**env: str) -> RefusalAuditSettings:
        return refusal_audit_settings(
            SettingsSource("SVC", env={f"SVC_REFUSAL_AUDIT_{k}": v for k, v in env.items()})
        )

    assert read(WINDOW_SECONDS="2.5", MAX_KINDS="7") == RefusalAuditSettings(2.5, 7)
    for window in ("0", "-1", "nan", "inf"):  # nan would make every window close at once; inf never
        with pytest.raises(SettingsError, match="SVC_REFUSAL_AUDIT_WINDOW_SECONDS"):
            read(WINDOW_SECONDS=window)
    with pytest.raises(SettingsError, match="SVC_REFUSAL_AUDIT_MAX_KINDS"):
        read(MAX_KINDS="0")
    with pytest.raises(ValueError):
        RefusalAuditSettings(window=float("nan"))


def test_secret_from_env_or_file_and_never_shown(tmp_path: Path) -> None:
    secret_file = _write(tmp_path / "pass.txt", "s3cret\n")
    from_file = SettingsSource("SVC", env={"SVC_CA_KEY_PASSPHRASE_FILE": str(secret_file)}).secret(
        "ca.key_passphrase"
    )
    assert from_file is not None and from_file.reveal() == "s3cret"
    assert "s3cret" not in repr(from_file) and "s3cret" not in str(from_file)
    from_env = SettingsSource("SVC", env={"SVC_CA_KEY_PASSPHRASE": "abc"}).secret("ca.key_passphrase")
    assert from_env is not None and from_env.reveal() == "abc"
    assert SettingsSource("SVC", env={}).secret("ca.key_passphrase") is None


def test_json_logs_carry_request_and_device_ids() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging("INFO", json_lines=True, stream=stream)
    try:
        with request_scope("req-7", Caller.internal()), bind_device_id("dev-1"):
            logging.getLogger("svc").info("minted", extra={"serial": "0A"})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    entry = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert entry["message"] == "minted"
    assert (entry["request_id"], entry["device_id"], entry["serial"]) == ("req-7", "dev-1", "0A")
