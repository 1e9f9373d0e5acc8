"""The device id policy: the canonical GUID by default, DPS's registration-id rules when relaxed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provkit.device_id import DeviceIdPolicy, check_device_id, is_valid_device_id
from provkit.errors import InvalidArgument
from provkit.settings import SettingsError, SettingsSource, device_id_policy

GUID = "3f2a9c1e-0000-4000-8000-00000000000a"


@given(st.uuids())
def test_every_guid_in_any_case_is_accepted_and_stored_lower_case(value) -> None:
    text = str(value)
    assert check_device_id(text.upper()) == text
    assert check_device_id(f"  {text}\n") == text


@pytest.mark.parametrize(
    "raw",
    [
        "not-a-guid",
        GUID[:-1],  # truncated
        GUID + "0",
        GUID.replace("-", ""),
        "{" + GUID + "}",
        GUID.replace("a", "g"),
        GUID.replace("-", "_"),
    ],
)
def test_anything_else_is_not_a_guid(raw: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        check_device_id(raw)
    assert refused.value.reason == "DEVICE_ID_NOT_A_GUID"
    assert [(v.field, v.description) for v in refused.value.field_violations] == [
        ("device_id", refused.value.message)
    ]
    assert repr(raw) in refused.value.message


def test_an_empty_id_and_a_field_path() -> None:
    with pytest.raises(InvalidArgument) as refused:
        check_device_id("  ", field="items[3].device_id")
    assert refused.value.reason == "DEVICE_ID_EMPTY"
    assert refused.value.field_violations[0].field == "items[3].device_id"


def test_a_long_input_is_not_echoed_whole() -> None:
    with pytest.raises(InvalidArgument) as refused:
        check_device_id("x" * 5000)
    assert len(refused.value.message) < 200


def test_the_relaxed_policy_follows_dps_registration_ids() -> None:
    relaxed = DeviceIdPolicy.REGISTRATION_ID
    assert check_device_id("Line-3.Press:7", relaxed) == "line-3.press:7"
    assert check_device_id(GUID, relaxed) == GUID
    for raw, reason in [
        ("a" * 65, "DEVICE_ID_TOO_LONG"),
        ("press 7", "DEVICE_ID_INVALID_CHARACTERS"),
        ("press.", "DEVICE_ID_INVALID_LAST_CHARACTER"),
    ]:
        with pytest.raises(InvalidArgument) as refused:
            check_device_id(raw, relaxed)
        assert refused.value.reason == reason
    assert is_valid_device_id("a" * 64) and not is_valid_device_id("a" * 64, DeviceIdPolicy.GUID)


def test_the_setting() -> None:
    assert device_id_policy(SettingsSource("FACTORY", env={})) is DeviceIdPolicy.GUID
    relaxed = SettingsSource("FACTORY", env={"FACTORY_DEVICE_IDS": "Registration-ID"})
    assert device_id_policy(relaxed) is DeviceIdPolicy.REGISTRATION_ID
    with pytest.raises(SettingsError) as wrong:
        device_id_policy(SettingsSource("FACTORY", env={"FACTORY_DEVICE_IDS": "uuid"}))
    assert str(wrong.value) == (
        "FACTORY_DEVICE_IDS / device_ids: device id policy 'uuid' is unknown; use 'guid' or 'registration-id'"
    )
