from __future__ import annotations

import pytest

from device_client.backoff import Backoff
from device_client.desired import apply_document, apply_patch, merge_patch
from device_client.errors import DeviceSettingsError
from device_client.settings import FactoryTls, load_settings, render_device_settings


def test_document_applies_interval_and_acks_everything():
    out = apply_document({"telemetryIntervalSeconds": 2, "machine": {"model": "X1"}, "$version": 7}, None)
    assert out.interval_s == 2.0
    assert out.version == 7
    assert out.properties == {"telemetryIntervalSeconds": 2, "machine": {"model": "X1"}}
    assert out.reported_patch["telemetryIntervalSeconds"] == {
        "value": 2.0,
        "ac": 200,
        "av": 7,
        "ad": "applied",
    }
    assert out.reported_patch["machine"]["ac"] == 200


@pytest.mark.parametrize("bad", ["fast", -1, 0, True, 10**9, None.__class__])
def test_bad_interval_is_rejected_and_current_kept(bad):
    value = bad if bad is not None.__class__ else {"nested": 1}
    out = apply_patch({}, {"telemetryIntervalSeconds": value, "$version": 3}, 5.0)
    assert out.interval_s == 5.0
    ack = out.reported_patch["telemetryIntervalSeconds"]
    assert ack["ac"] == 400 and ack["av"] == 3 and ack["value"] == 5.0


def test_patch_merges_and_deletes():
    current = {"telemetryIntervalSeconds": 2, "machine": {"model": "X1", "line": "A"}}
    out = apply_patch(current, {"machine": {"line": None, "site": "B"}, "$version": 4}, 2.0)
    assert out.properties == {"telemetryIntervalSeconds": 2, "machine": {"model": "X1", "site": "B"}}
    assert set(out.reported_patch) == {"machine"}
    assert out.interval_s == 2.0
    out = apply_patch(out.properties, {"telemetryIntervalSeconds": None, "$version": 5}, 2.0)
    assert out.interval_s is None  # back to the configured default
    assert out.reported_patch == {"telemetryIntervalSeconds": None}


def test_merge_patch_does_not_mutate():
    base = {"a": {"b": 1}}
    merged = merge_patch(base, {"a": {"c": 2}})
    assert base == {"a": {"b": 1}} and merged == {"a": {"b": 1, "c": 2}}


def test_settings_layers(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('id_scope = "0ne00000001"\ntelemetry_interval_s = 3\ntrusted_ca_file = "ca.pem"\n')
    device = tmp_path / "settings.toml"
    device.write_bytes(render_device_settings({"global_endpoint": "127.0.0.9", "id_scope": "0neFROMDEV"}))
    s = load_settings(
        env={"DEVICE_CLIENT_ID_SCOPE": "0neFROMENV"},
        config_file=config,
        device_settings=device,
        overrides={"telemetry_interval_s": 0.2, "state_root": None},
    )
    assert s.cloud.id_scope == "0neFROMENV"
    assert s.cloud.global_endpoint == "127.0.0.9"
    assert s.cloud.trusted_ca_file == tmp_path / "ca.pem"  # relative to the file that names it
    assert s.runtime.telemetry_interval_s == 0.2
    assert s.factory.tls is FactoryTls.INSECURE


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"telemetry_interval_s": "soon"}, "SETTINGS_INVALID"),
        ({"factory_tls": "maybe"}, "SETTINGS_INVALID"),
        ({"factory_address": "nohost"}, "SETTINGS_INVALID"),
        ({"factory_address": "10.1.2.3:50051"}, "INSECURE_NOT_LOOPBACK"),
        ({"factory_tls": "mtls"}, "SETTINGS_INVALID"),
        ({"backoff_initial_s": 10, "backoff_max_s": 1}, "SETTINGS_INVALID"),
    ],
)
def test_bad_settings(overrides, reason):
    with pytest.raises(DeviceSettingsError) as err:
        load_settings(env={}, overrides=overrides)
    assert err.value.reason == reason


def test_unknown_key_in_file(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("telemetry_intervall = 3\n")
    with pytest.raises(DeviceSettingsError) as err:
        load_settings(env={}, config_file=config)
    assert err.value.reason == "SETTINGS_UNKNOWN_KEY"


def test_missing_scope_is_clear():
    with pytest.raises(DeviceSettingsError) as err:
        load_settings(env={}).cloud.require_scope()
    assert err.value.reason == "ID_SCOPE_MISSING"


def test_backoff_is_capped_and_grows():
    b = Backoff(initial_s=1.0, max_s=8.0, jitter=0.0)
    assert [b.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    b.reset()
    assert b.next_delay() == 1.0
    j = Backoff(initial_s=1.0, max_s=8.0)
    assert all(0.0 <= j.next_delay() <= 8.0 for _ in range(50))
