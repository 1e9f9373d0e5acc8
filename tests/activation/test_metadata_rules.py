"""Azure's twin rules for activation metadata: each violation is reported with its field path."""

from __future__ import annotations

import json

import pytest

from activation_svc.metadata import parse_metadata
from provkit.errors import InvalidArgument


def violations(text: str) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        parse_metadata(text)
    return {v.field: v.description for v in caught.value.field_violations}


def test_the_seed_shape_passes():
    meta = parse_metadata(
        json.dumps(
            {"tags": {"line": "A", "site": {"hall": 3}}, "properties": {"desired": {"fw": "1.2", "n": 5}}}
        )
    )
    assert meta.tags == {"line": "A", "site": {"hall": 3}}
    assert meta.desired == {"fw": "1.2", "n": 5}
    assert meta.initial_twin() == {"tags": dict(meta.tags), "properties": {"desired": dict(meta.desired)}}


def test_empty_means_no_metadata():
    meta = parse_metadata("")
    assert meta.tags == {} and meta.desired == {}


@pytest.mark.parametrize(
    ("key", "problem"),
    [("a$b", "'$'"), ("a.b", "'.'"), ("a b", "spaces"), ("a\u0001b", "control"), ("", "empty")],
)
def test_bad_keys(key, problem):
    found = violations(json.dumps({"tags": {key: 1}}))
    assert found == {f"metadata_json.tags.{key}": found[f"metadata_json.tags.{key}"]}
    assert problem in found[f"metadata_json.tags.{key}"]


def test_nested_bad_key_in_desired():
    found = violations(json.dumps({"properties": {"desired": {"ok": {"bad.key": 1}}}}))
    assert list(found) == ["metadata_json.properties.desired.ok.bad.key"]


def test_depth_limit():
    deep: dict = {"v": 1}
    for name in "edcba":
        deep = {name: deep}
    parse_metadata(json.dumps({"tags": {"x": {"y": {"z": {"w": 1}}}}}))
    found = violations(json.dumps({"tags": deep}))
    assert any("nested" in d for d in found.values())


def test_sizes():
    found = violations(json.dumps({"tags": {f"k{i}": "x" * 100 for i in range(90)}}))
    assert "8192" in found["metadata_json.tags"]
    parse_metadata(json.dumps({"properties": {"desired": {f"k{i}": "x" * 100 for i in range(200)}}}))
    found = violations(json.dumps({"properties": {"desired": {f"k{i}": "x" * 1000 for i in range(40)}}}))
    assert "32768" in found["metadata_json.properties.desired"]


def test_json_values_only():
    found = violations('{"tags": {"a": NaN}}')
    assert list(found) == ["metadata_json"]
    found = violations('{"tags": {"a": null}}')
    assert "null" in found["metadata_json.tags.a"]
    found = violations("not json")
    assert list(found) == ["metadata_json"]


def test_shape_errors_are_all_reported():
    found = violations(json.dumps({"tags": [], "properties": {"reported": {}, "desired": 3}, "other": 1}))
    assert set(found) == {
        "metadata_json.tags",
        "metadata_json.properties.reported",
        "metadata_json.properties.desired",
        "metadata_json.other",
    }
    with pytest.raises(InvalidArgument) as caught:
        parse_metadata("[1, 2]")
    assert caught.value.reason == "METADATA_INVALID"
