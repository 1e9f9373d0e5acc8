from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import pytest
from support.certs import TestCa

from device_client.errors import IdentityError, IdentityExistsError, StateError, UsageError
from device_client.identity import normalise_guid
from device_client.state import Assignment, DesiredState, StateDir
from provkit.device_id import DeviceIdPolicy

GUID = "7c4f3e1a-0b2d-4c6e-9f8a-1234567890ab"


@pytest.fixture(scope="module")
def ca() -> TestCa:
    return TestCa()


def provisioned(tmp_path, ca: TestCa, guid: str = GUID, **validity) -> StateDir:
    state = StateDir(tmp_path, guid)
    key_pem, chain_pem = ca.identity(guid, **validity)
    state.write_identity(key_pem=key_pem, chain_pem=chain_pem, metadata={"guid": guid}, force=False)
    return state


def test_identity_round_trip_and_key_mode(tmp_path, ca):
    state = provisioned(tmp_path, ca)
    assert os.stat(state.key_path).st_mode & 0o777 == 0o600
    ident = state.load_identity(now=datetime.now(UTC))
    assert ident.info.guid == GUID
    assert ident.info.chain_length == 2
    assert ident.info.key_type == "ec-secp256r1"
    assert len(ident.info.thumbprint_sha1) == 40 and ident.info.thumbprint_sha1.isupper()


def test_refuses_overwrite_without_force(tmp_path, ca):
    state = provisioned(tmp_path, ca)
    before = state.chain_path.read_bytes()
    key_pem, chain_pem = ca.identity(GUID)
    with pytest.raises(IdentityExistsError) as err:
        state.write_identity(key_pem=key_pem, chain_pem=chain_pem, metadata={"guid": GUID}, force=False)
    assert err.value.reason == "IDENTITY_EXISTS"
    assert state.chain_path.read_bytes() == before
    state.write_assignment(Assignment("127.0.0.2", GUID, datetime.now(UTC)))
    state.write_identity(key_pem=key_pem, chain_pem=chain_pem, metadata={"guid": GUID}, force=True)
    assert state.chain_path.read_bytes() == chain_pem
    assert state.read_assignment() is None  # a new certificate invalidates the cached assignment


def test_missing_state_dir(tmp_path):
    with pytest.raises(StateError) as err:
        StateDir(tmp_path, GUID).load_identity()
    assert err.value.reason == "STATE_DIR_MISSING"
    assert "device-client provision" in err.value.message


def test_incomplete_state_dir(tmp_path, ca):
    state = provisioned(tmp_path, ca)
    state.chain_path.unlink()
    with pytest.raises(StateError) as err:
        state.load_identity()
    assert err.value.reason == "STATE_INCOMPLETE"
    assert "device-chain.pem" in err.value.message


@pytest.mark.parametrize("victim", ["device.key", "device-chain.pem", "identity.json"])
def test_corrupted_files(tmp_path, ca, victim):
    state = provisioned(tmp_path, ca)
    (state.path / victim).write_bytes(b"\x00garbage\xff")
    with pytest.raises(StateError) as err:
        state.load_identity()
    assert err.value.reason == "STATE_CORRUPTED"


def test_key_not_matching_certificate(tmp_path, ca):
    state = provisioned(tmp_path, ca)
    other_key, _ = ca.identity(GUID)
    state.key_path.write_bytes(other_key)
    with pytest.raises(IdentityError) as err:
        state.load_identity()
    assert err.value.reason == "KEY_CERTIFICATE_MISMATCH"


def test_certificate_for_another_device(tmp_path, ca):
    state = StateDir(tmp_path, GUID)
    key_pem, chain_pem = ca.identity("someone-else")
    state.write_identity(key_pem=key_pem, chain_pem=chain_pem, metadata={"guid": GUID}, force=False)
    with pytest.raises(IdentityError) as err:
        state.load_identity()
    assert err.value.reason == "CERTIFICATE_SUBJECT_MISMATCH"


def test_expired_and_not_yet_valid(tmp_path, ca):
    now = datetime.now(UTC)
    state = provisioned(tmp_path, ca, not_before=now - timedelta(days=10), not_after=now - timedelta(days=1))
    assert state.load_identity().info.not_after < now  # readable for `status` ...
    with pytest.raises(IdentityError) as err:  # ... but not usable
        state.load_identity(now=now)
    assert err.value.reason == "CERTIFICATE_EXPIRED"
    later = provisioned(tmp_path / "b", ca, not_before=now + timedelta(days=1))
    with pytest.raises(IdentityError) as err:
        later.load_identity(now=now)
    assert err.value.reason == "CERTIFICATE_NOT_YET_VALID"


def test_world_readable_key_is_refused(tmp_path, ca):
    state = provisioned(tmp_path, ca)
    os.chmod(state.key_path, 0o644)
    with pytest.raises(StateError) as err:
        state.load_identity()
    assert err.value.reason == "KEY_PERMISSIONS"


def test_assignment_cache_round_trip_and_corruption(tmp_path, ca):
    state = provisioned(tmp_path, ca)
    assert state.read_assignment() is None
    a = Assignment("127.0.0.2", GUID, datetime.now(UTC), "0ne00000001")
    state.write_assignment(a)
    assert state.read_assignment() == a
    (state.path / "assignment.json").write_text("{not json")
    assert state.read_assignment() is None  # a broken cache costs one registration, nothing more
    state.write_desired(DesiredState(3, {"telemetryIntervalSeconds": 1}))
    assert state.read_desired() == DesiredState(3, {"telemetryIntervalSeconds": 1})
    assert json.loads((state.path / "desired.json").read_text())["version"] == 3


def test_lock_is_exclusive(tmp_path, ca):
    state = provisioned(tmp_path, ca)
    with state.locked():
        with pytest.raises(StateError) as err, StateDir(tmp_path, GUID).locked():
            pass
        assert err.value.reason == "STATE_IN_USE"
    with state.locked():
        pass


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "DEVICE_ID_EMPTY"),
        ("a" * 65, "DEVICE_ID_TOO_LONG"),
        ("bad/char", "DEVICE_ID_INVALID_CHARACTERS"),
        ("ends.", "DEVICE_ID_INVALID_LAST_CHARACTER"),
        ("spa ce", "DEVICE_ID_INVALID_CHARACTERS"),
    ],
)
def test_registration_id_rules(raw, reason):
    with pytest.raises(UsageError) as err:
        normalise_guid(raw, DeviceIdPolicy.REGISTRATION_ID)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "raw", ["not-a-guid", "3f2a9c1e-0000-4000-8000-00000000000", "{3f2a9c1e-0000-4000-8000-000000000001}"]
)
def test_guid_policy_refuses_what_is_not_a_guid(raw):
    with pytest.raises(UsageError) as err:
        normalise_guid(raw)
    assert err.value.reason == "DEVICE_ID_NOT_A_GUID"
    assert err.value.exit_code == 2


def test_guid_normalised():
    assert normalise_guid(" 3F2A9C1E-0000-4000-8000-00000000000A ") == "3f2a9c1e-0000-4000-8000-00000000000a"
    assert normalise_guid(" ABC-def:1.2_3 ", DeviceIdPolicy.REGISTRATION_ID) == "abc-def:1.2_3"
    assert normalise_guid("x-", DeviceIdPolicy.REGISTRATION_ID) == "x-"
