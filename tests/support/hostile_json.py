"""The one list of hostile JSON inputs every JSON entry point is tested with (DESIGN §10: "a new entry
point joins the list, not a new set of ad-hoc cases").  tests/hostile/test_hostile_json_entry_points.py
runs each shape against each entry point; a new shape here is tried everywhere.

A shape is the JSON text of a value that an entry point places where its request expects a value
(``shape.body(template)``), or, with ``whole``, the entire body.  ``reason`` is what ``jsonsafe`` refuses it
with (None: ``jsonsafe`` parses it and the entry point's own rules must refuse it, e.g. an array where an
object is required).  ``utf8`` False: bytes that are not UTF-8, which only entry points that carry bytes
(HTTP bodies, MQTT payloads) can receive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Hostile:
    name: str
    value: bytes
    reason: str | None
    whole: bool = False
    utf8: bool = True

    @property
    def syntax(self) -> bool:
        """Not JSON text at all (as opposed to JSON text with something refused in it)."""
        return self.reason in ("NOT_JSON", "NOT_UTF8")

    def body(self, template: Callable[[bytes], bytes]) -> bytes:
        """The request body: ``template`` (an otherwise valid body around one value) with this shape in it,
        or the shape itself when it is a whole body."""
        return self.value if self.whole else template(self.value)


def _nested(levels: int, open_: bytes, close: bytes, inner: bytes = b"1") -> bytes:
    return open_ * levels + inner + close * levels


SHAPES: tuple[Hostile, ...] = (
    Hostile("arrays-1000", _nested(1000, b"[", b"]"), "TOO_DEEP"),
    Hostile("objects-1000", _nested(1000, b'{"a":', b"}"), "TOO_DEEP"),
    Hostile("arrays-100000", _nested(100_000, b"[", b"]"), "TOO_DEEP"),
    Hostile("objects-100000", _nested(100_000, b'{"":', b"}"), "TOO_DEEP"),
    Hostile("whole-body-arrays-100000", _nested(100_000, b"[", b"]"), "TOO_DEEP", whole=True),
    Hostile("lone-surrogate-value", b'"\\ud800"', "LONE_SURROGATE"),
    Hostile("lone-surrogate-key", b'{"\\udc00": 1}', "LONE_SURROGATE"),
    Hostile("lone-surrogate-in-array", b'["ok", "x\\udbff"]', "LONE_SURROGATE"),
    Hostile("high-surrogate-then-letter", b'"\\ud800\\u0041"', "LONE_SURROGATE"),
    Hostile("huge-float", b"1e999", "NUMBER_OUT_OF_RANGE"),
    Hostile("huge-negative-float", b"-1e999", "NUMBER_OUT_OF_RANGE"),
    Hostile("integer-400-digits", b"9" * 400, "NUMBER_OUT_OF_RANGE"),
    Hostile("integer-5000-digits", b"9" * 5000, "NUMBER_OUT_OF_RANGE"),
    Hostile("nan-literal", b"NaN", "NOT_JSON"),
    Hostile("minus-infinity-literal", b"-Infinity", "NOT_JSON"),
    Hostile("duplicate-keys", b'{"a": 1, "a": 2}', "DUPLICATE_KEY"),
    Hostile("raw-control-character", b'"a\x01b"', "NOT_JSON"),
    Hostile("truncated", b'{"a": [', "NOT_JSON", whole=True),
    Hostile("not-utf8", b'"\xff\xfe"', "NOT_UTF8", utf8=False),
    Hostile("utf8-encoded-surrogate", b'"\xed\xa0\x80"', "NOT_UTF8", utf8=False),
    Hostile("top-level-array", b"[1, 2]", None, whole=True),
    Hostile("top-level-string", b'"x"', None, whole=True),
)


def shape_id(shape: Hostile) -> str:
    return shape.name
