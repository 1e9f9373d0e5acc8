"""Templates loaded and checked (at start-up), and metadata checked against them (every Activate).

Validation uses ``jsonschema``'s Draft 2020-12 validator with a ``referencing.Registry`` of the
template alone (whose default refuses to retrieve anything, where jsonschema's own default registry would
fetch remote ``$ref`` s): a template's ``$ref`` may point into the template only (checked when it is
loaded), so checking metadata never reaches the network or the file system.  ``format`` is asserted
(``date``, ``email``, ``uri``, ... as jsonschema's format checker knows them), not only annotated.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
from jsonschema.exceptions import ValidationError
from referencing.jsonschema import DRAFT202012

import jsonsafe
from activation_svc.errors import Reason
from provkit.context import Caller
from provkit.errors import FieldViolation, InvalidArgument
from provkit.parties import is_tenant
from provkit.settings import SettingsError, SettingsSource

SECTIONS = ("tags", "desired")
MAX_VIOLATIONS = 20
MAX_TEMPLATE_BYTES = 256 * 1024
_ROOT_URI = "urn:devprov:template"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def request_path(path: tuple[str | int, ...], field: str = "metadata_json") -> str:
    """A template path (``("desired", "x", 0)``) as the request names it: ``metadata_json.properties.
    desired.x[0]`` (the twin's shape, like the twin rules' violations)."""
    out = field
    for index, part in enumerate(path):
        if isinstance(part, int):
            out += f"[{part}]"
        elif index == 0 and part == "desired":
            out += ".properties.desired"
        else:
            out += f".{part}"
    return out


def _problem_paths(error: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    """Where an error is, naming the missing or unexpected key itself (not only its parent object)."""
    path = tuple(error.absolute_path)
    instance = error.instance
    if error.validator == "required" and isinstance(instance, dict):
        wanted: Any = error.validator_value
        missing = [k for k in wanted if k not in instance]
        return [((*path, k), "required by the template, missing") for k in missing]
    if error.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(instance, dict):
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        extra = [k for k in instance if k not in known]
        if extra:
            return [((*path, k), "not in the template") for k in extra]
    return [(path, error.message)]


@dataclass(frozen=True)
class Template:
    tenant: str
    schema: Mapping[str, Any]
    source: str = ""  # where it was read from, for messages
    _validator: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def build(cls, tenant: str, schema: Any, source: str = "") -> Template:
        """Check ``schema`` as a template; ``SettingsError`` naming the tenant when it is not one."""
        where = f"the metadata template of OEM tenant {tenant!r}" + (f" ({source})" if source else "")
        if not isinstance(schema, dict):
            raise SettingsError(f"{where} must be a JSON object (a JSON Schema)")
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            at = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            raise SettingsError(
                f"{where} is not a valid JSON Schema (Draft 2020-12) at {at}: {exc.message}"
            ) from None
        if schema.get("type") != "object":
            raise SettingsError(f'{where} must describe an object ("type": "object") of "tags" and "desired"')
        unknown = sorted(set(schema.get("properties", {})) - set(SECTIONS))
        if unknown:
            raise SettingsError(
                f'{where} may only have the properties "tags" and "desired" (the twin\'s tags and desired '
                f"properties), not {unknown}"
            )
        resource = DRAFT202012.create_resource(schema)
        registry: referencing.Registry[Any] = referencing.Registry().with_resource(_ROOT_URI, resource)
        resolver = registry.resolver(base_uri=_ROOT_URI)
        for ref in _refs(schema):
            if not ref.startswith("#"):
                raise SettingsError(f"{where}: $ref {ref!r} points outside the template (only '#...' refs)")
            try:
                resolver.lookup(ref)
            except referencing.exceptions.Unresolvable:
                raise SettingsError(f"{where}: $ref {ref!r} does not resolve inside the template") from None
        validator = jsonschema.Draft202012Validator(
            schema,
            registry=registry,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        )
        return cls(tenant, schema, source, validator)

    def text(self) -> str:
        """The schema as JSON in its own key order (the order the form shows its fields in)."""
        return json.dumps(self.schema, separators=(",", ":"), ensure_ascii=False)

    def canonical(self) -> str:
        return json.dumps(self.schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def digest(self) -> str:
        """The template's SHA-256 (first 16 hex digits), named in a refusal so an OEM knows which one."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    def violations(
        self, tags: Mapping[str, Any], desired: Mapping[str, Any], field: str = "metadata_json"
    ) -> list[FieldViolation]:
        instance = {"tags": dict(tags), "desired": dict(desired)}
        errors = sorted(
            self._validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path]
        )
        out: list[FieldViolation] = []
        for error in errors:
            for path, description in _problem_paths(error):
                if len(out) < MAX_VIOLATIONS:
                    out.append(FieldViolation(request_path(path, field), description))
        return out

    def check(
        self, tags: Mapping[str, Any], desired: Mapping[str, Any], field: str = "metadata_json"
    ) -> None:
        """InvalidArgument METADATA_TEMPLATE_VIOLATION naming each field, or nothing."""
        found = self.violations(tags, desired, field)
        if found:
            first = found[0]
            raise InvalidArgument(
                Reason.METADATA_TEMPLATE_VIOLATION,
                f"the metadata does not match OEM {self.tenant!r}'s template ({len(found)} problem(s)); "
                f"first: {first.field}: {first.description}",
                metadata={
                    "field": first.field,
                    "violations": str(len(found)),
                    "template": self.digest,
                    "tenant": self.tenant,
                },
                field_violations=found,
            )


def load_template(tenant: str, path: Path) -> Template:
    where = f"the metadata template of OEM tenant {tenant!r} ({path})"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read {where}: {exc.strerror or exc}", "SETTINGS_UNREADABLE") from exc
    if len(data) > MAX_TEMPLATE_BYTES:
        raise SettingsError(f"{where} is larger than {MAX_TEMPLATE_BYTES} bytes")
    try:
        schema = jsonsafe.loads(data)
    except jsonsafe.JsonRefused as exc:
        raise SettingsError(f"{where} is not usable JSON: {exc}") from None
    return Template.build(tenant, schema, str(path))


@dataclass(frozen=True)
class Templates:
    by_tenant: Mapping[str, Template] = field(default_factory=dict)

    def for_caller(self, caller: Caller) -> Template | None:
        tenant = caller.oem
        return self.by_tenant.get(tenant) if tenant else None


def _entries(source: SettingsSource) -> dict[str, Path]:
    raw = source.value("templates")
    if raw is None:
        return {}
    if isinstance(raw, dict):  # [templates] in a settings file: tenant = "path"
        out: dict[str, Path] = {}
        for tenant in raw:
            path = source.path(f"templates.{tenant}")
            if path is None:
                raise SettingsError(f"templates.{tenant} must name a JSON Schema file")
            out[str(tenant)] = path
        return out
    entries: dict[str, Path] = {}
    for item in str(raw).split(","):
        if not item.strip():
            continue
        tenant, sep, path_text = item.partition("=")
        if not sep or not tenant.strip() or not path_text.strip():
            raise SettingsError(
                f"{source.describe('templates')} takes tenant=file pairs separated by commas, got {item!r}"
            )
        entries[tenant.strip()] = Path(path_text.strip()).expanduser()
    return entries


def load_templates(source: SettingsSource) -> Templates:
    templates: dict[str, Template] = {}
    for tenant, path in _entries(source).items():
        if not is_tenant(tenant):
            raise SettingsError(
                f"templates: {tenant!r} is not an OEM tenant (1-63 characters of a-z, 0-9 and '-')"
            )
        templates[tenant] = load_template(tenant, path)
    return Templates(templates)
