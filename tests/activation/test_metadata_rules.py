"""Azure's twin rules for activation metadata: each violation is reported with its field path."""

from __future__ import annotations

import json

import pytest

from activation_svc.metadata import parse_metadata, requested_metadata, target_twin
from activation_svc.model import MetadataChange
from provkit.cloud import InitialTwin
from provkit.errors import FailedPrecondition, InvalidArgument


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


HAS = InitialTwin({"location": "Hamburg"}, {"telemetryIntervalSeconds": 5})


@pytest.mark.parametrize("text", ["", "   \n"])
def test_no_metadata_keeps_what_the_device_has(text):
    request = requested_metadata(text, clear=False)
    assert request.change is MetadataChange.KEPT
    assert target_twin(request, HAS) == HAS
    assert target_twin(request, None) == InitialTwin()  # a first activation of a bare enrollment


def test_metadata_replaces_and_the_clear_flag_clears():
    sent = json.dumps({"tags": {"location": "Lyon"}})
    replaced = requested_metadata(sent, clear=False)
    assert replaced.change is MetadataChange.REPLACED
    assert target_twin(replaced, HAS) == InitialTwin({"location": "Lyon"}, {})
    cleared = requested_metadata("", clear=True)
    assert cleared.change is MetadataChange.CLEARED and target_twin(cleared, HAS) == InitialTwin()
    # what tells them apart in an idempotency fingerprint and in the audit
    assert len({r.fingerprint() for r in (replaced, cleared, requested_metadata("", clear=False))}) == 3
    assert replaced.summary().startswith("metadata_sha256=") and cleared.summary() == "metadata=cleared"


def test_clearing_is_never_a_side_effect():
    with pytest.raises(InvalidArgument) as both:
        requested_metadata('{"tags": {"a": 1}}', clear=True)
    assert both.value.reason == "METADATA_CONFLICT"
    assert [v.field for v in both.value.field_violations] == ["clear_metadata"]
    empty = requested_metadata('{"tags": {}, "properties": {"desired": {}}}', clear=False)
    with pytest.raises(FailedPrecondition) as refused:
        target_twin(empty, HAS)
    assert refused.value.reason == "METADATA_EMPTY"
    assert target_twin(empty, InitialTwin()) == InitialTwin()  # nothing to remove: fine
