"""The twin document model: merge, versions, metadata, Azure's limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from azure_iot_emulator.hub import twin as tm

T1, T2 = "2026-01-01T00:00:00.0000000Z", "2026-01-01T00:00:01.0000000Z"


def test_desired_patch_merges_deletes_and_versions():
    twin = tm.new_twin(T1)
    twin, delta = tm.apply_service_update(
        twin, tags=None, desired={"a": {"b": 1, "c": 2}, "x": 1}, timestamp=T1
    )
    assert delta == {"a": {"b": 1, "c": 2}, "x": 1}
    assert twin.desired.version == 2 and twin.version == 2
    twin, delta = tm.apply_service_update(
        twin, tags=None, desired={"a": {"b": None}, "x": None}, timestamp=T2
    )
    assert twin.desired.props == {"a": {"c": 2}}
    assert delta == {"a": {"b": None}, "x": None}
    meta = twin.desired.metadata
    assert meta["$lastUpdatedVersion"] == 3 and meta["$lastUpdated"] == T2
    assert meta["a"]["c"] == {"$lastUpdated": T1, "$lastUpdatedVersion": 2}
    assert meta["a"]["$lastUpdatedVersion"] == 3
    assert "x" not in meta
    doc = twin.desired.document()
    assert doc["$version"] == 3 and doc["a"] == {"c": 2}


def test_replace_all_replaces():
    twin, _ = tm.apply_service_update(tm.new_twin(T1), tags={"a": 1}, desired={"x": 1}, timestamp=T1)
    twin, delta = tm.apply_service_update(
        twin, tags={"b": 2}, desired={"y": 2}, timestamp=T2, replace_all=True
    )
    assert twin.tags == {"b": 2} and twin.desired.props == {"y": 2} and delta == {"y": 2}


def test_tags_only_do_not_bump_desired():
    twin, delta = tm.apply_service_update(tm.new_twin(T1), tags={"a": 1}, desired={}, timestamp=T1)
    assert delta is None and twin.desired.version == 1 and twin.version == 2


def test_reported_patch_has_no_lastupdatedversion():
    twin = tm.apply_reported_patch(tm.new_twin(T1), {"fw": "1.0"}, timestamp=T2)
    assert twin.reported.version == 2
    assert twin.reported.metadata["fw"] == {"$lastUpdated": T2}


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ([1, 2], "NOT_AN_OBJECT"),
        ("text", "NOT_AN_OBJECT"),
        ({"a.b": 1}, "INVALID_KEY"),
        ({"$x": 1}, "INVALID_KEY"),
        ({"a b": 1}, "INVALID_KEY"),
        ({"a\x01": 1}, "INVALID_KEY"),
        ({"l1": {"l2": {"l3": {"l4": {"l5": {"l6": 1}}}}}}, "DEPTH_EXCEEDED"),
        ({"s": "x" * 5000}, "VALUE_TOO_LONG"),
        ({f"k{i}": "v" * 1000 for i in range(40)}, "TWIN_TOO_LARGE"),
    ],
)
def test_bad_reported_patches_are_refused(patch, reason):
    twin = tm.new_twin(T1)
    with pytest.raises(tm.TwinError) as info:
        tm.apply_reported_patch(twin, patch, timestamp=T2)
    assert info.value.reason == reason


def test_depth_five_is_allowed():
    twin = tm.apply_reported_patch(tm.new_twin(T1), {"l1": {"l2": {"l3": {"l4": {"l5": 1}}}}}, timestamp=T2)
    assert twin.reported.props["l1"]["l2"]["l3"]["l4"]["l5"] == 1


def test_tags_limit_is_8k():
    with pytest.raises(tm.TwinError):
        tm.apply_service_update(
            tm.new_twin(T1), tags={f"k{i}": "v" * 1000 for i in range(9)}, desired=None, timestamp=T1
        )


def test_service_readonly_keys_are_stripped():
    assert tm.strip_service_readonly({"$metadata": {}, "$version": 3, "a": 1}) == {"a": 1}


keys = st.text(alphabet="abcxyz", min_size=1, max_size=3)
leaf = st.one_of(st.none(), st.integers(-5, 5), st.text(alphabet="ab", max_size=3), st.booleans())
patches = st.recursive(leaf, lambda inner: st.dictionaries(keys, inner, max_size=4), max_leaves=12).filter(
    lambda v: isinstance(v, dict)
)


def _reference_merge(target, patch):
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            result[key] = _reference_merge(result.get(key), value)
        else:
            result[key] = value
    return result


def _meta_mirrors(props, meta):
    for key, value in props.items():
        assert key in meta and "$lastUpdated" in meta[key]
        if isinstance(value, dict):
            _meta_mirrors(value, meta[key])
    for key in meta:
        assert key.startswith("$") or key in props


@given(patches, patches)
def test_merge_matches_rfc7386_and_metadata_mirrors_properties(first, second):
    twin = tm.new_twin(T1)
    twin, _ = tm.apply_service_update(twin, tags=None, desired=first, timestamp=T1)
    twin, _ = tm.apply_service_update(twin, tags=None, desired=second, timestamp=T2)
    assert twin.desired.props == _reference_merge(_reference_merge({}, first), second)
    _meta_mirrors(twin.desired.props, twin.desired.metadata)
