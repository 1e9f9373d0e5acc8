"""A template as form fields (the portal's form, the batch's CSV columns) and text back to typed metadata.

``template_fields(schema) -> FieldSet``: one ``TemplateField`` per leaf property under ``tags`` and
``desired`` (nested objects are walked, local ``$ref`` followed): a ``kind`` (``text``, ``number``,
``integer``, ``choice`` for an ``enum``, ``boolean``), its ``title`` and ``description``, whether it is
``required`` (in its object's ``required`` list, that object being required or the root) and a
``placeholder`` (the schema's first ``examples`` entry, else its ``default``: shown, never sent).
What cannot be a single field (arrays, objects with no properties, ...) is listed in ``FieldSet.skipped``:
those are edited in the portal's advanced JSON view (or with ``--metadata`` in a batch).

A field's ``name`` is its path with dots (``tags.location.city``, ``desired.telemetryIntervalSeconds``):
the form's input names (``field:`` + name) and the CSV's column headers.  Twin keys never hold a dot.

``metadata_from_values(fields, values) -> dict``: the metadata ``{"tags": ..., "properties": {"desired":
...}}`` from text values by name.  An empty text is left out (so ``required`` catches it); an integer,
number or boolean that does not read as one is sent as the text typed, so the service's template check
refuses it naming the field (every rule stays in the service).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jsonsafe

Kind = Literal["text", "number", "integer", "choice", "boolean"]
FORM_PREFIX = "field:"
MAX_DEPTH = 5
_INTEGER = re.compile(r"^[+-]?\d{1,15}$")
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclass(frozen=True)
class TemplateField:
    path: tuple[str, ...]  # ("tags", "location", "city")
    kind: Kind
    title: str
    description: str = ""
    required: bool = False
    choices: tuple[Any, ...] = ()
    placeholder: str = ""

    @property
    def name(self) -> str:
        return ".".join(self.path)

    def choice_value(self, value: Any) -> str:
        """An enum value as the form's option value (its JSON text)."""
        return _json(value)

    def typed(self, text: str) -> Any:
        """The value to send for ``text`` (``None``: nothing typed, leave the property out)."""
        text = text.strip()
        if not text:
            return None
        if self.kind == "integer" and _INTEGER.match(text):
            return int(text)
        if self.kind == "number" and _NUMBER.match(text):
            number = float(text)
            if math.isfinite(number):
                return int(number) if _INTEGER.match(text) else number
        if self.kind == "boolean" and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        if self.kind == "choice":
            for choice in self.choices:
                if text == _json(choice) or (isinstance(choice, str) and text == choice):
                    return choice
        return text


@dataclass(frozen=True)
class FieldSet:
    fields: tuple[TemplateField, ...] = ()
    skipped: tuple[str, ...] = ()  # paths edited as JSON only

    def by_name(self) -> dict[str, TemplateField]:
        return {f.name: f for f in self.fields}


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _resolve(node: Any, root: Mapping[str, Any]) -> Any:
    """Follow local ``$ref`` s ("#/$defs/x"), a few hops at most."""
    for _ in range(8):
        if not isinstance(node, dict) or not isinstance(node.get("$ref"), str):
            return node
        ref = node["$ref"]
        if not ref.startswith("#"):
            return node
        target: Any = root
        for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return {}
            target = target[part]
        merged = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **merged} if isinstance(target, dict) else target
    return node


def _type(node: Mapping[str, Any]) -> str:
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return kinds[0] if len(kinds) == 1 else ""
    return kind if isinstance(kind, str) else ""


def _placeholder(node: Mapping[str, Any]) -> str:
    examples = node.get("examples")
    if isinstance(examples, list) and examples:
        value = examples[0]
    elif "default" in node:
        value = node["default"]
    else:
        return ""
    return value if isinstance(value, str) else _json(value)


def _walk(
    node: Any,
    path: tuple[str, ...],
    required: bool,
    root: Mapping[str, Any],
    out: list[TemplateField],
    skipped: list[str],
) -> None:
    node = _resolve(node, root)
    if not isinstance(node, dict):
        skipped.append(".".join(path))
        return
    title = str(node.get("title") or path[-1])
    description = str(node.get("description") or "")
    if isinstance(node.get("enum"), list) and node["enum"]:
        out.append(
            TemplateField(
                path, "choice", title, description, required, tuple(node["enum"]), _placeholder(node)
            )
        )
        return
    kind = _type(node)
    if kind == "object" or (not kind and isinstance(node.get("properties"), dict)):
        properties = node.get("properties")
        if not isinstance(properties, dict) or not properties or len(path) > MAX_DEPTH:
            skipped.append(".".join(path))
            return
        names = node.get("required")
        needed = set(names) if isinstance(names, list) else set()
        for key, child in properties.items():
            _walk(child, (*path, str(key)), required and key in needed, root, out, skipped)
        return
    if kind in ("string", "number", "integer", "boolean"):
        as_kind: Kind = "text" if kind == "string" else kind  # type: ignore[assignment]
        out.append(TemplateField(path, as_kind, title, description, required, (), _placeholder(node)))
        return
    skipped.append(".".join(path))


def template_fields(schema: Mapping[str, Any]) -> FieldSet:
    out: list[TemplateField] = []
    skipped: list[str] = []
    root = _resolve(schema, schema)
    properties = root.get("properties", {}) if isinstance(root, dict) else {}
    names = root.get("required", []) if isinstance(root, dict) else []
    for section in ("tags", "desired"):
        if section in properties:
            _walk(properties[section], (section,), section in names, schema, out, skipped)
    return FieldSet(tuple(out), tuple(skipped))


def metadata_from_values(fields: FieldSet, values: Mapping[str, str]) -> dict[str, Any]:
    sections: dict[str, dict[str, Any]] = {"tags": {}, "desired": {}}
    for item in fields.fields:
        value = item.typed(values.get(item.name, ""))
        if value is None:
            continue
        node = sections[item.path[0]]
        for key in item.path[1:-1]:
            node = node.setdefault(key, {})
        node[item.path[-1]] = value
    return {"tags": sections["tags"], "properties": {"desired": sections["desired"]}}


def parse_template_json(text: str) -> dict[str, Any] | None:
    """A template as the service sent it (JSON text), or None for none / unusable text."""
    if not text.strip():
        return None
    try:
        value = jsonsafe.loads(text)
    except jsonsafe.JsonRefused:
        return None
    return value if isinstance(value, dict) else None


__all__ = ["FORM_PREFIX", "FieldSet", "TemplateField", "metadata_from_values", "template_fields"]
