"""The subset of IoT Hub's query language that back offices run on twins (pure).

    SELECT * FROM devices [WHERE <condition>]
    SELECT COUNT() [AS name] FROM devices [WHERE <condition>]
    SELECT <path> [AS name], ... [, COUNT() [AS name]] FROM devices [WHERE <condition>] [GROUP BY <path>, ...]

Conditions: ``<path> <op> <literal>`` with ``= != <> < <= > >=``, ``<path> IN [<literal>, ...]``,
``IS_DEFINED(<path>)``, joined by ``AND``/``OR``/``NOT`` and parentheses.  Paths are dotted twin fields
(``deviceId``, ``status``, ``tags.site``, ``properties.reported.fw``); literals are 'strings' or "strings",
numbers, ``true``, ``false``, ``null`` (no escapes inside strings).  Keywords are case-insensitive,
paths case-sensitive.  As in Azure, a comparison with a missing field or a value of another type is
undefined, and only rows whose condition is true match (``NOT`` of undefined is still undefined).
Anything else is a :class:`QueryError` naming what is not supported: never a guess, never a wrong
answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class QueryError(Exception):
    """The query is malformed or uses syntax this emulator does not implement (HTTP 400)."""


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'[^']*'|"[^"]*")
      | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
      | (?P<op><=|>=|<>|!=|=|<|>)
      | (?P<punct>[(),\[\]*])
      | (?P<word>[A-Za-z_$][A-Za-z0-9_$]*(?:\.[A-Za-z_$][A-Za-z0-9_$]*)*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"select", "from", "where", "and", "or", "not", "in", "as", "group", "by", "count", "is_defined"}


@dataclass(frozen=True)
class _Tok:
    kind: str  # string, number, op, punct, word, keyword, end
    text: str
    at: int


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise QueryError(f"unsupported syntax at position {pos}: {text[pos:pos + 20]!r}")
        kind = match.lastgroup or ""
        value, start = match.group(kind), match.start(kind)
        if kind == "word" and value.lower() in _KEYWORDS:
            kind, value = "keyword", value.lower()
        out.append(_Tok(kind, value, start))
        pos = match.end()
    out.append(_Tok("end", "", len(text)))
    return out


Row = Mapping[str, Any]
Predicate = Callable[[Row], bool | None]
"""True, False, or None for *undefined* (a missing field, values of different types): a row matches only
when its condition is True, and undefined stays undefined through NOT, as in Azure's query language."""

_MISSING = object()


def lookup(doc: Row, path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _comparable(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers)) or (isinstance(a, str) and isinstance(b, str))


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<>": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _compare(path: str, op: str, literal: Any) -> Predicate:
    def test(row: Row) -> bool | None:
        value = lookup(row, path)
        if value is _MISSING:
            return None
        if value is None or literal is None:
            if op == "=":
                return value is None and literal is None
            if op in ("!=", "<>"):
                return (value is None) != (literal is None)
            return None
        if not _comparable(value, literal):
            return None
        return _OPS[op](value, literal)

    return test


def _any(results: Sequence[bool | None]) -> bool | None:
    if True in results:
        return True
    return None if None in results else False


def _all(results: Sequence[bool | None]) -> bool | None:
    if False in results:
        return False
    return None if None in results else True


@dataclass(frozen=True)
class Projection:
    path: str | None  # None: COUNT()
    name: str


@dataclass(frozen=True)
class Query:
    star: bool
    projections: tuple[Projection, ...]
    where: Predicate
    group_by: tuple[str, ...]

    def run(self, rows: Iterable[Row]) -> list[dict[str, Any]]:
        matching = [row for row in rows if self.where(row) is True]
        if self.star:
            return [dict(row) for row in matching]
        counts = [p for p in self.projections if p.path is None]
        fields = [p for p in self.projections if p.path is not None]
        if not self.group_by:
            if counts:
                return [{p.name: len(matching) for p in counts}]
            return [_project(row, fields) for row in matching]
        groups: dict[str, tuple[list[Any], int]] = {}
        for row in matching:
            values = [lookup(row, path) for path in self.group_by]
            key = json.dumps([None if v is _MISSING else v for v in values], sort_keys=True)
            previous = groups.get(key)
            groups[key] = (values, (previous[1] if previous else 0) + 1)
        out = []
        for values, count in groups.values():
            by_path = dict(zip(self.group_by, values, strict=True))
            item: dict[str, Any] = {}
            for p in self.projections:
                if p.path is None:
                    item[p.name] = count
                elif by_path[p.path] is not _MISSING:
                    item[p.name] = by_path[p.path]
            out.append(item)
        return out


def _project(row: Row, fields: Sequence[Projection]) -> dict[str, Any]:
    item: dict[str, Any] = {}
    for p in fields:
        assert p.path is not None
        value = lookup(row, p.path)
        if value is not _MISSING:
            item[p.name] = value
    return item


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def _fail(self, what: str) -> QueryError:
        tok = self.tok
        found = "the end of the query" if tok.kind == "end" else repr(tok.text)
        return QueryError(f"{what} at position {tok.at}, found {found}")

    def accept(self, kind: str, text: str | None = None) -> _Tok | None:
        tok = self.tok
        if tok.kind == kind and (text is None or tok.text == text):
            self.i += 1
            return tok
        return None

    def expect(self, kind: str, text: str | None = None, what: str = "") -> _Tok:
        tok = self.accept(kind, text)
        if tok is None:
            raise self._fail(f"expected {what or text or kind}")
        return tok

    def parse(self) -> Query:
        self.expect("keyword", "select", "SELECT")
        star, projections = self._select_list()
        self.expect("keyword", "from", "FROM")
        source = self.expect("word", what="a collection")
        if source.text.lower() != "devices":
            raise QueryError(f"only FROM devices is supported (not {source.text!r}: modules, jobs)")
        where: Predicate = lambda row: True  # noqa: E731
        if self.accept("keyword", "where"):
            where = self._or()
        group_by: tuple[str, ...] = ()
        if self.accept("keyword", "group"):
            self.expect("keyword", "by", "BY")
            paths = [self.expect("word", what="a field to group by").text]
            while self.accept("punct", ","):
                paths.append(self.expect("word", what="a field to group by").text)
            group_by = tuple(paths)
        if self.tok.kind != "end":
            raise self._fail("unsupported syntax (ORDER BY, TOP, joins... are not emulated)")
        self._check_shape(star, projections, group_by)
        return Query(star, projections, where, group_by)

    def _select_list(self) -> tuple[bool, tuple[Projection, ...]]:
        if self.accept("punct", "*"):
            return True, ()
        items = [self._select_item(1)]
        while self.accept("punct", ","):
            items.append(self._select_item(len(items) + 1))
        return False, tuple(items)

    def _select_item(self, position: int) -> Projection:
        if self.accept("keyword", "count"):
            self.expect("punct", "(", "'(' after COUNT")
            self.expect("punct", ")", "')': COUNT() takes no argument")
            path = None
            default = f"${position}"
        else:
            path = self.expect("word", what="'*', COUNT() or a field").text
            default = path.rsplit(".", 1)[-1]
        name = self.expect("word", what="a name after AS").text if self.accept("keyword", "as") else default
        return Projection(path, name)

    @staticmethod
    def _check_shape(star: bool, projections: Sequence[Projection], group_by: Sequence[str]) -> None:
        fields = [p.path for p in projections if p.path is not None]
        has_count = any(p.path is None for p in projections)
        if star and group_by:
            raise QueryError("SELECT * cannot be grouped: select the grouped fields and COUNT()")
        if group_by and not has_count:
            raise QueryError("GROUP BY needs COUNT() in the SELECT list (the only aggregate emulated)")
        if has_count and fields and not group_by:
            raise QueryError("fields next to COUNT() need a GROUP BY of those fields")
        missing = [f for f in fields if group_by and f not in group_by]
        if missing:
            raise QueryError(f"selected fields must be grouped: {', '.join(missing)}")

    def _or(self) -> Predicate:
        terms = [self._and()]
        while self.accept("keyword", "or"):
            terms.append(self._and())
        return terms[0] if len(terms) == 1 else (lambda row: _any([t(row) for t in terms]))

    def _and(self) -> Predicate:
        terms = [self._not()]
        while self.accept("keyword", "and"):
            terms.append(self._not())
        return terms[0] if len(terms) == 1 else (lambda row: _all([t(row) for t in terms]))

    def _not(self) -> Predicate:
        if self.accept("keyword", "not"):
            inner = self._not()
            return lambda row: None if (result := inner(row)) is None else not result
        return self._primary()

    def _primary(self) -> Predicate:
        if self.accept("punct", "("):
            inner = self._or()
            self.expect("punct", ")", "')'")
            return inner
        if self.accept("keyword", "is_defined"):
            self.expect("punct", "(", "'(' after IS_DEFINED")
            path = self.expect("word", what="a field").text
            self.expect("punct", ")", "')'")
            return lambda row: lookup(row, path) is not _MISSING
        path = self.expect("word", what="a condition (field, IS_DEFINED(), NOT or '(')").text
        if self.accept("keyword", "in"):
            self.expect("punct", "[", "'[' after IN")
            values = [self._literal()]
            while self.accept("punct", ","):
                values.append(self._literal())
            self.expect("punct", "]", "']'")
            tests = [_compare(path, "=", v) for v in values]
            return lambda row: _any([t(row) for t in tests])
        op = self.expect("op", what="a comparison operator (= != <> < <= > >=)").text
        return _compare(path, op, self._literal())

    def _literal(self) -> Any:
        tok = self.tok
        if self.accept("string"):
            return tok.text[1:-1]
        if self.accept("number"):
            return float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
        if tok.kind == "word" and tok.text.lower() in ("true", "false", "null"):
            self.i += 1
            return {"true": True, "false": False, "null": None}[tok.text.lower()]
        raise self._fail("expected a literal ('string', number, true, false, null)")


def parse_query(text: str) -> Query:
    if not isinstance(text, str) or not text.strip():
        raise QueryError("the query is empty")
    return _Parser(text).parse()


def parse_condition(text: str, check_field: Callable[[str], None] | None = None) -> Predicate:
    """A condition alone, as message routes take it: ``true``, ``false`` or what may follow ``WHERE``.
    ``check_field`` sees every field name first and may refuse one (a :class:`QueryError`)."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError("the condition is empty (write true to take everything)")
    parser = _Parser(text)
    words = [tok for tok in parser.toks if tok.kind == "word"]
    if len(parser.toks) == 2 and len(words) == 1 and words[0].text.lower() in ("true", "false"):
        constant = words[0].text.lower() == "true"
        return lambda row: constant
    if check_field is not None:
        for tok in words:
            if tok.text.lower() not in ("true", "false", "null"):
                check_field(tok.text)
    predicate = parser._or()
    if parser.tok.kind != "end":
        raise parser._fail("unsupported syntax after the condition")
    return predicate
