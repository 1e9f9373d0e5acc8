"""Metadata templates: the shape an OEM's device metadata must have, as a JSON Schema per OEM tenant.

A template is a JSON Schema (Draft 2020-12) of one object with two properties, ``tags`` (the twin's tags)
and ``desired`` (the twin's desired properties): the metadata ``{"tags": T, "properties": {"desired": D}}``
is checked as ``{"tags": T, "desired": D}``.  Every other keyword (``required``, ``enum``, ``minimum``,
``pattern``, ``additionalProperties``, local ``$ref`` to ``$defs``, ...) is the schema's own; ``title`` and
``description`` label the portal's form fields; ``examples`` and ``default`` are only ever shown as
placeholders, never sent as values.  Azure's twin rules (``activation_svc.metadata``) still apply on top.

Where templates come from (``activation_svc.settings``): ``[templates]`` in the service's TOML file, one
``tenant = "file.schema.json"`` per OEM tenant (a relative path resolves against the settings file), or
ACTIVATION_TEMPLATES = ``acme=/etc/acme.schema.json,globex=...``.  Each is read and checked at start-up;
a file that cannot be read, is not JSON, is not a valid Draft 2020-12 schema, is not an object schema of
``tags`` / ``desired``, or has a ``$ref`` outside itself stops the service with a ``SettingsError`` (a
``ConfigurationError``) naming the tenant.  An OEM tenant without a template keeps the twin rules only.

Which template applies: the caller's OEM (``Caller.oem``: the OEM itself or a portal for it, so the
gRPC API, the portal and the batch all meet the same one).  In-process callers are no party: none.

``schema``: ``Template``, ``Templates``, ``load_template(tenant, path)``, ``load_templates(source)``,
``Template.violations(metadata, field)`` (``FieldViolation`` s, paths as the request names them).
``fields``: ``TemplateField``, ``template_fields(schema)`` (what the portal renders and the batch's CSV
columns name), ``metadata_from_values(fields, values)`` (form or CSV text to typed metadata).
"""
