"""jsonsafe: JSON text from outside (a request body, a form field, an MQTT payload) parsed so that no input
reaches a traceback: what cannot be stored, re-encoded or walked safely is refused here, with a stable
reason, before any caller sees a value.

API
---
``loads(data, *, max_depth=MAX_DEPTH) -> Any``
    ``data`` is ``str`` or ``bytes`` (UTF-8, a leading BOM skipped).  Returns what ``json.loads`` would
    (dicts, lists, str, int, float, bool, None), or raises :class:`JsonRefused`.
``JsonRefused(reason, message)``  a ``ValueError``; ``reason`` is one of:

    NOT_UTF8             bytes that are not UTF-8 (also UTF-8-encoded surrogates, which Python's own
                         ``json.loads`` lets through)
    NOT_JSON             not JSON text: syntax, ``NaN`` / ``Infinity`` literals, raw control characters
                         inside strings, empty text
    TOO_DEEP             arrays and objects nested more than ``max_depth`` levels (found by an
                         iterative scan of the text before parsing: 100,000 levels cost a scan, not a
                         RecursionError)
    LONE_SURROGATE       a ``\\ud800``-``\\udfff`` escape that is not half of a pair, in a key or a value:
                         not Unicode text, so it could never be written as UTF-8 later
    NUMBER_OUT_OF_RANGE  a number no double can hold (``1e999``, an integer of hundreds of digits):
                         Python would make it ``inf`` or a huge int that re-encodes as non-JSON
    DUPLICATE_KEY        one key twice in an object (parsers disagree on which one wins)

    ``syntax`` is true for NOT_UTF8 and NOT_JSON (the text is not JSON at all), false for the others
    (JSON text with something in it that is refused).

``MAX_DEPTH`` (64) is a structural bound, far above any document this project reads (a twin allows 5 levels
of properties); the callers' own rules (twin depth, sizes, types) still apply to what is returned.

Why a package of its own: every program that takes JSON from outside uses it, the services (through their
metadata and forms) and the Azure emulator (REST bodies, MQTT payloads), and the emulator imports nothing
from the suite.  So, like ``litestore``, it depends on the standard library only and on no other package of
the project.  Keep it that way.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from typing import Any

__all__ = ["MAX_DEPTH", "REASONS", "JsonRefused", "loads"]

MAX_DEPTH = 64

REASONS = frozenset(
    ("NOT_UTF8", "NOT_JSON", "TOO_DEEP", "LONE_SURROGATE", "NUMBER_OUT_OF_RANGE", "DUPLICATE_KEY")
)
_SYNTAX = frozenset(("NOT_UTF8", "NOT_JSON"))

# A JSON string (the unrolled-loop form: linear, no backtracking), removed before counting brackets.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
# Worth a walk for lone surrogates: an escape of one, or a raw one (only a str input can hold it).
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF]|[\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# An integer literal with more digits than this is beyond a double's range (1.8e308) anyway.
_MAX_INT_DIGITS = 309
_BOM = b"\xef\xbb\xbf"


class JsonRefused(ValueError):
    """JSON text refused before any caller saw its value; ``reason`` is stable (see the module doc)."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown jsonsafe reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def syntax(self) -> bool:
        """True when the text is not JSON at all (NOT_UTF8, NOT_JSON)."""
        return self.reason in _SYNTAX


def _depth(text: str) -> int:
    """How deeply arrays and objects nest in ``text``, without recursion (strings removed first)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(_STEP[c] for c in brackets), default=0)


def _parse_constant(name: str) -> Any:
    raise JsonRefused("NOT_JSON", f"{name} is not a JSON value")


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JsonRefused("NUMBER_OUT_OF_RANGE", f"the number {text[:40]} is beyond what a double can hold")
    return value


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    value = int(text) if digits <= _MAX_INT_DIGITS else None
    if value is None or abs(value) > sys.float_info.max:
        raise JsonRefused(
            "NUMBER_OUT_OF_RANGE", f"an integer of {digits} digits is beyond what a double can hold"
        )
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonRefused("DUPLICATE_KEY", f"the key {key!r} appears twice in one object")
            seen.add(key)
    return result


def _check_surrogates(value: Any) -> None:
    """Refuse a lone surrogate in any key or string value (iteratively: depth is already bounded, but a
    wide document must not cost a recursion per level either)."""
    pending: list[tuple[Any, str]] = [(value, "$")]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise JsonRefused("LONE_SURROGATE", f"a lone surrogate in the string at {path}")
        elif isinstance(item, dict):
            for key, child in item.items():
                if _SURROGATE.search(key):
                    raise JsonRefused("LONE_SURROGATE", f"a lone surrogate in a key at {path}")
                pending.append((child, f"{path}.{key}"))
        elif isinstance(item, list):
            pending.extend((child, f"{path}[{index}]") for index, child in enumerate(item))


def loads(data: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text from outside; :class:`JsonRefused` for anything refused (see the module doc)."""
    if isinstance(data, bytes | bytearray):
        raw = bytes(data)
        try:
            text = raw.removeprefix(_BOM).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonRefused("NOT_UTF8", f"not UTF-8 text (byte {exc.start})") from None
    else:
        text = data
    depth = _depth(text)
    if depth > max_depth:
        raise JsonRefused("TOO_DEEP", f"nested {depth} levels deep; at most {max_depth} are accepted")
    try:
        value = json.loads(
            text,
            parse_constant=_parse_constant,
            parse_float=_parse_float,
            parse_int=_parse_int,
            object_pairs_hook=_object,
        )
    except json.JSONDecodeError as exc:
        raise JsonRefused("NOT_JSON", f"not valid JSON: {exc}") from None
    except RecursionError:  # not reached with a sane max_depth; a refusal all the same
        raise JsonRefused("TOO_DEEP", "nested too deeply to parse") from None
    if _MAYBE_SURROGATE.search(text):
        _check_surrogates(value)
    return value
