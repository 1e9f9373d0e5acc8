"""jsonsafe.loads on its own: every shape of the shared hostile list refused with its reason (as a whole
document and inside one), and every ordinary JSON value parsed exactly as json.loads parses it."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.hostile_json import SHAPES, Hostile, shape_id

import jsonsafe

REFUSED = [s for s in SHAPES if s.reason is not None]


@pytest.mark.parametrize("shape", REFUSED, ids=shape_id)
def test_every_hostile_shape_is_refused_with_its_reason_alone_and_inside_a_document(shape: Hostile) -> None:
    inside = shape.body(lambda value: b'{"tags": {"ok": [1, "two"], "k": ' + value + b"}}")
    for data in (shape.value, inside):
        with pytest.raises(jsonsafe.JsonRefused) as refused:
            jsonsafe.loads(data)
        assert refused.value.reason == shape.reason
        assert refused.value.syntax == shape.syntax
        assert isinstance(refused.value, ValueError)
        if shape.utf8:  # the same text as str: the same answer
            with pytest.raises(jsonsafe.JsonRefused) as again:
                jsonsafe.loads(data.decode("utf-8"))
            assert again.value.reason == shape.reason


@pytest.mark.parametrize("shape", [s for s in SHAPES if s.reason is None], ids=shape_id)
def test_shapes_left_to_the_entry_points_rules_parse(shape: Hostile) -> None:
    assert jsonsafe.loads(shape.value) == json.loads(shape.value)


def test_depth_bound_is_exact_and_ignores_brackets_inside_strings() -> None:
    assert jsonsafe.loads("[" * 64 + "]" * 64) is not None
    with pytest.raises(jsonsafe.JsonRefused) as refused:
        jsonsafe.loads("[" * 65 + "]" * 65)
    assert refused.value.reason == "TOO_DEEP"
    assert jsonsafe.loads('{"a": 1}', max_depth=1) == {"a": 1}
    with pytest.raises(jsonsafe.JsonRefused):
        jsonsafe.loads('{"a": [1]}', max_depth=1)
    brackets = "[{" * 5000
    assert jsonsafe.loads(json.dumps({"s": brackets, "t": 'a\\"[['})) == {"s": brackets, "t": 'a\\"[['}


def test_what_looks_like_a_surrogate_but_is_not_one_is_kept() -> None:
    assert jsonsafe.loads('"\\ud83d\\ude00"') == "\U0001f600"  # a pair: one character
    assert jsonsafe.loads('["\\\\ud800"]') == ["\\ud800"]  # an escaped backslash, then text
    assert jsonsafe.loads(b'\xef\xbb\xbf{"a": "\xc3\xa9"}') == {"a": "\u00e9"}  # BOM skipped


def test_numbers_within_a_doubles_range_are_kept() -> None:
    assert jsonsafe.loads("[1e308, -1e308, 12345678901234567890, 0.5, -0]") == [
        1e308,
        -1e308,
        12345678901234567890,
        0.5,
        0,
    ]
    assert jsonsafe.loads("9" * 308) == int("9" * 308)


def test_an_unknown_reason_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown jsonsafe reason"):
        jsonsafe.JsonRefused("SOMETHING", "x")


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=30,
)


@given(_values, st.booleans())
def test_ordinary_json_parses_as_json_loads_parses_it(value: object, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    parsed = jsonsafe.loads(text)
    assert parsed == json.loads(text)
    assert jsonsafe.loads(text.encode("utf-8")) == parsed
    if isinstance(value, float):
        assert math.isfinite(parsed)
