"""The portal's pages, rendered on the server with every value escaped (``portal.html``).  No page ever
contains the activation code: forms that come back with an error leave the code field empty."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from string import Template
from urllib.parse import urlencode

from activation_svc.batch.shipment import RowResult
from activation_svc.portal.errors import FieldProblem, ServiceProblem
from activation_svc.portal.html import Html, attrs, escape, join, render
from activation_svc.portal.settings import HubChoice
from activation_svc.templates.fields import FORM_PREFIX, FieldSet, TemplateField

MAX_DEVICE_ID = 128
MAX_CODE = 64
MAX_HUB = 255
MAX_REQUEST_ID = 64
MAX_METADATA_CHARS = 96 * 1024
MAX_CHECKBOX = 8  # a ticked box sends "on"
MAX_FIELD = 4096  # one template field's text (a twin string is at most 4 KB)

METADATA_PLACEHOLDER = '{"tags": {...}, "properties": {"desired": {...}}}'

_LAYOUT = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>$title · Device activation</title>
<link rel="stylesheet" href="/static/portal.css">
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
</head>
<body>
<header><div class="bar"><strong>Device activation</strong>
<nav><a href="/"$nav_activate>Activate</a> · <a href="/batch"$nav_batch>Shipment</a> · \
<a href="/status"$nav_status>Status</a></nav></div></header>
<main>
<h1>$title</h1>
$body
</main>
<footer>Every rule (activation code, metadata, rate limits, audit) is enforced by the activation service.
</footer>
$scripts
</body>
</html>
""")


def layout(title: str, body: Html, *, section: str = "", script: bool = False) -> Html:
    current = Html(' aria-current="page"')
    return render(
        _LAYOUT,
        title=title,
        body=body,
        nav_activate=current if section == "activate" else Html(""),
        nav_status=current if section == "status" else Html(""),
        nav_batch=current if section == "batch" else Html(""),
        scripts=Html('<script src="/static/portal.js" defer></script>') if script else Html(""),
    )


# ------------------------------------------------------------------------------------------- helpers
# Each problem of a field is said once, next to the field; the panel above the form says what happened and
# points at the fields.  ``Anchors`` maps a problem to the element it is shown beside (its id and the label
# to link with), or None when the page has no such field (the panel then says it).
Anchor = tuple[str, str]


def _problem_panel(problem: ServiceProblem, anchor: Callable[[FieldProblem], Anchor | None]) -> Html:
    loose = [p for p in problem.fields if anchor(p) is None]
    marked: dict[str, str] = {}
    for p in problem.fields:
        found = anchor(p)
        if found is not None:
            marked.setdefault(*found)
    items = [
        Html(
            f"<li><strong>{escape(p.label)}</strong>"
            + (f' <span class="code">{escape(p.path)}</span>' if p.path else "")
            + f": {escape(p.description)}</li>"
        )
        for p in loose
    ]
    links = join((Html(f'<a href="#{escape(i)}">{escape(label)}</a>') for i, label in marked.items()), ", ")
    pointer = (
        Html(f'<p id="problem-fields">Fix the field{"s" * (len(marked) > 1)} marked below: {links}.</p>')
        if marked
        else Html("")
    )
    retry = (
        Html(f'<p id="retry">Try again in {escape(max(1, round(problem.retry_after)))} s.</p>')
        if problem.retry_after
        else Html("")
    )
    said = f": {escape(problem.message)}" if problem.message and not problem.fields else ""
    return Html(
        '<section class="panel bad" role="alert" id="problem">'
        f"<h2>{escape(problem.title)}</h2>"
        + (f"<p>{escape(problem.sentence)}</p>" if problem.sentence else "")
        + pointer
        + (f"<ul>{join(items)}</ul>" if items else "")
        + retry
        + f'<p class="code">{escape(problem.code)} {escape(problem.reason)}{said}</p>'
        "</section>"
    )


def _field_errors(problems: Sequence[FieldProblem], name: str) -> Html:
    """Under a field: its problems (the page's script writes its own checks here too, so a message is
    never shown twice)."""
    lines = [
        Html("<p>" + (f"{escape(p.path)}: " if p.path else "") + f"{escape(p.description)}</p>")
        for p in problems
        if p.name == name
    ]
    return Html(f'<div class="field-error" id="{name}-error" aria-live="polite">{join(lines)}</div>')


def _input_attrs(name: str, invalid: frozenset[str]) -> Html:
    invalid_now = "true" if name in invalid else None
    return attrs(aria_invalid=invalid_now, aria_describedby=f"{name}-hint {name}-error")


@dataclass(frozen=True)
class ActivateForm:
    device_id: str = ""
    hub: str = ""
    metadata: str = ""  # the advanced view's JSON (never pre-filled with sample values)
    clear_metadata: bool = False
    problem: ServiceProblem | None = None
    local_problems: tuple[FieldProblem, ...] = field(default=())
    fields: FieldSet | None = None  # the OEM's template as form fields (None: no template, JSON only)
    values: Mapping[str, str] = field(default_factory=dict)  # the template fields as typed


def template_path(problem_path: str) -> str:
    """A problem's path inside the metadata (``properties.desired.x``) as a template field's name."""
    return "desired." + problem_path.removeprefix("properties.desired.") if problem_path.startswith(
        "properties.desired."
    ) else problem_path


def _template_input(item: TemplateField, index: int, value: str, problems: Sequence[FieldProblem]) -> Html:
    mine = [p for p in problems if p.name == "metadata" and template_path(p.path) == item.name]
    ident = f"f-{index}"
    name = FORM_PREFIX + item.name
    common = attrs(
        id_=ident,
        name=name,
        aria_invalid="true" if mine else None,
        aria_required="true" if item.required else None,
        aria_describedby=f"{ident}-hint",
        data_field=item.name,
    )
    if item.kind == "choice" or item.kind == "boolean":
        choices = (
            [(item.choice_value(c), str(c)) for c in item.choices]
            if item.kind == "choice"
            else [("true", "Yes"), ("false", "No")]
        )
        options = [Html(f'<option value=""{attrs(selected=not value)}>— choose —</option>')]
        options += [
            Html(f"<option{attrs(value=v, selected=value == v)}>{escape(label)}</option>")
            for v, label in choices
        ]
        control = Html(f"<select{common}>{join(options)}</select>")
    else:
        mode = {"integer": "numeric", "number": "decimal"}.get(item.kind, "text")
        control = Html(
            f"<input{common}{attrs(value=value, placeholder=item.placeholder or None, inputmode=mode)}"
            f' maxlength="{MAX_FIELD}" autocomplete="off">'
        )
    mark = Html(' <span class="req" title="required">*</span>') if item.required else Html("")
    kind = {"integer": "a whole number", "number": "a number", "boolean": "yes or no"}.get(item.kind, "")
    hint = " · ".join(x for x in (item.description, kind) if x)
    errors = join(Html(f'<p class="field-error">{escape(p.description)}</p>') for p in mine)
    return Html(
        f'<label for="{ident}">{escape(item.title)}{mark}</label>{control}'
        f'<p class="hint" id="{ident}-hint">{escape(hint)}'
        f' <span class="code">{escape(item.name)}</span></p>{errors}'
    )


def _template_form(fields: FieldSet, values: Mapping[str, str], problems: Sequence[FieldProblem]) -> Html:
    sections = []
    for section, legend in (("tags", "Tags"), ("desired", "Desired properties")):
        items = [
            _template_input(item, index, values.get(item.name, ""), problems)
            for index, item in enumerate(fields.fields)
            if item.path[0] == section
        ]
        if items:
            sections.append(
                Html(f'<fieldset class="template"><legend>{legend}</legend>{join(items)}</fieldset>')
            )
    skipped = (
        Html(
            '<p class="hint">Edited in the JSON view only: '
            + join((Html(f'<span class="code">{escape(p)}</span>') for p in fields.skipped), ", ")
            + "</p>"
        )
        if fields.skipped
        else Html("")
    )
    return Html(
        '<p class="hint" id="template-hint">The metadata your company\'s template asks for; fields marked '
        '<span class="req">*</span> are required.</p>' + join(sections) + skipped
    )


def _top_panel(
    problem: ServiceProblem | None,
    local_problems: tuple[FieldProblem, ...],
    anchor: Callable[[FieldProblem], Anchor | None],
) -> Html:
    """The service's answer above a form, or the fields refused before anything was sent."""
    if problem is not None:
        return _problem_panel(problem, anchor)
    if local_problems:
        return _problem_panel(
            ServiceProblem("Not sent", "Some fields are too long.", "", "", "", local_problems, 400), anchor
        )
    return Html("")


_IDENTITY = frozenset({"device_id", "activation_code"})


def _identity_anchor(problem: FieldProblem) -> Anchor | None:
    return (problem.name, problem.label) if problem.name in _IDENTITY else None


def _identity_fields(
    device_id: str, problems: Sequence[FieldProblem], invalid: frozenset[str], code_hint: str
) -> Html:
    """The device GUID and activation code inputs (the code is never echoed back)."""
    return Html(
        f"""<label for="device_id">Device ID (GUID)</label>
<input id="device_id" name="device_id" value="{escape(device_id)}" maxlength="{MAX_DEVICE_ID}" required
 autocapitalize="off" spellcheck="false"{_input_attrs("device_id", invalid)}>
<p class="hint" id="device_id-hint">As printed on the label.</p>{_field_errors(problems, "device_id")}
<label for="activation_code">Activation code</label>
<input id="activation_code" name="activation_code" value="" maxlength="{MAX_CODE}" required
 autocapitalize="characters" spellcheck="false"{_input_attrs("activation_code", invalid)}>
<p class="hint" id="activation_code-hint">{escape(code_hint)}</p>\
{_field_errors(problems, "activation_code")}"""
    )


def _raw_metadata(form: ActivateForm, problems: Sequence[FieldProblem], invalid: frozenset[str]) -> Html:
    """The metadata as JSON (the advanced view), its check button and the remove box."""
    loose = [p for p in problems if p.name != "metadata" or form.fields is None or not _is_field(form, p)]
    return Html(
        f"""<label for="metadata">Metadata (device twin) as JSON</label>
<textarea id="metadata" name="metadata" rows="10" spellcheck="false"{attrs(placeholder=METADATA_PLACEHOLDER)}\
{_input_attrs("metadata", invalid)}>{escape(form.metadata)}</textarea>
<p class="hint" id="metadata-hint">It replaces the device's metadata. Empty: the device keeps the \
metadata it has (e.g. to change its hub).</p>
{_field_errors(loose, "metadata")}<div class="row">
<button type="button" class="secondary" id="format-json" hidden>Check and format JSON</button>
<span id="metadata-check" class="hint" aria-live="polite"></span></div>
<label class="check" for="clear_metadata"><input type="checkbox" id="clear_metadata" name="clear_metadata" \
value="on"{attrs(checked=form.clear_metadata)}{_input_attrs("clear_metadata", invalid)}> \
Remove the device's metadata</label>
<p class="hint" id="clear_metadata-hint">Removes its tags and desired properties (leave the metadata field \
empty).</p>{_field_errors(problems, "clear_metadata")}
"""
    )


def _is_field(form: ActivateForm, problem: FieldProblem) -> bool:
    return form.fields is not None and template_path(problem.path) in form.fields.by_name()


def _activate_anchor(form: ActivateForm) -> Callable[[FieldProblem], Anchor | None]:
    """Where the activate page shows a problem: beside its input, a template field's or the JSON's."""
    positions = {item.name: index for index, item in enumerate(form.fields.fields)} if form.fields else {}

    def anchor(problem: FieldProblem) -> Anchor | None:
        if problem.name == "metadata" and form.fields is not None and _is_field(form, problem):
            item = form.fields.by_name()[template_path(problem.path)]
            return f"f-{positions[item.name]}", item.title
        if problem.name in _IDENTITY or problem.name in ("hub", "metadata", "clear_metadata"):
            return problem.name, problem.label
        return None

    return anchor


def activate_page(form: ActivateForm, hubs: HubChoice, csrf_token: str, request_id: str) -> Html:
    problems = (*form.local_problems, *(form.problem.fields if form.problem else ()))
    invalid = frozenset(p.name for p in problems if p.name)
    options = [
        Html(
            f'<option value=""{attrs(selected=not form.hub)}>'
            + escape(f"Default hub ({hubs.default})" if hubs.default else "The service's default hub")
            + "</option>"
        )
    ]
    for name in hubs.names:
        chosen = form.hub.lower() == name.lower()
        options.append(Html(f"<option{attrs(value=name, selected=chosen)}>{escape(name)}</option>"))
    if form.hub and not any(form.hub.lower() == n.lower() for n in hubs.names):
        options.append(Html(f"<option{attrs(value=form.hub, selected=True)}>{escape(form.hub)}</option>"))
    top = _top_panel(form.problem, form.local_problems, _activate_anchor(form))
    identity = _identity_fields(
        form.device_id, problems, invalid, "From the label; dashes, spaces and case do not matter."
    )
    raw = _raw_metadata(form, problems, invalid)
    if form.fields is not None:
        said_in_json = any(
            p.name in ("metadata", "clear_metadata") and not _is_field(form, p) for p in problems
        )
        opened = attrs(open=bool(form.metadata.strip() or form.clear_metadata or said_in_json))
        metadata = Html(
            _template_form(form.fields, form.values, problems)
            + f'<details class="advanced"{opened}><summary>Advanced: the metadata as JSON</summary>'
            '<p class="hint">JSON written here is sent instead of the fields above (it must still match '
            "the template).</p>"
            + raw
            + "</details>"
        )
    else:
        metadata = raw
    body = Html(
        f"""{top}<form method="post" action="/activate" autocomplete="off" novalidate>
<input type="hidden" name="csrf_token" value="{escape(csrf_token)}">
<input type="hidden" name="request_id" value="{escape(request_id)}">
{identity}
<label for="hub">IoT hub</label>
<select id="hub" name="hub"{_input_attrs("hub", invalid)}>{join(options)}</select>
<p class="hint" id="hub-hint">The hub the device will live on.</p>{_field_errors(problems, "hub")}
{metadata}
<div class="actions"><button type="submit">Activate</button></div>
</form>"""
    )
    return layout("Activate a device", body, section="activate", script=True)


# What happened (the heading and a sentence), then what comes next, for each ActivationPath.
_PATH_TEXT = {
    "UNCHANGED": (
        "Already active",
        "The device was already activated with exactly this metadata and hub: nothing changed.",
    ),
    "ENROLLMENT": (
        "Activated",
        "The device may now come online: its enrollment is enabled with this metadata and hub. It gets "
        "them when it registers.",
    ),
    "ENROLLMENT_AND_HUB_TWIN": (
        "Updated",
        "The device had registered already: its enrollment and its twin on the hub were both updated.",
    ),
}
_NEXT_TEXT = {
    "UNCHANGED": "Nothing else to do.",
    "ENROLLMENT": "Next: switch the device on (one that is on keeps trying, and gets in within minutes). "
    "Its status shows when it has registered.",
    "ENROLLMENT_AND_HUB_TWIN": "Nothing else to do: a connected device gets the change at once, another "
    "one when it next connects.",
}
# When the device kept its metadata, what the path says of "this metadata" and "its twin" does not apply.
_KEPT_PATH_TEXT = {
    "UNCHANGED": "The device was already activated on this hub: nothing changed.",
    "ENROLLMENT": "The device may now come online: its enrollment is enabled with this hub.",
    "ENROLLMENT_AND_HUB_TWIN": "The device had registered already: its identity on the hub is enabled again.",
}
_METADATA_TEXT = {
    "KEPT": "Metadata kept: no metadata was sent, so the device's tags and desired properties stay as they "
    "were.",
    "REPLACED": "Metadata replaced: the device's tags and desired properties are the ones sent.",
    "CLEARED": "Metadata cleared: the device's tags and desired properties were removed.",
}


def _details(rows: Mapping[str, object]) -> Html:
    parts = []
    for label, value in rows.items():
        if value in ("", None):
            continue
        slug = "v-" + label.lower().replace(" ", "-")
        parts.append(Html(f"<dt>{escape(label)}</dt><dd{attrs(id_=slug)}>{escape(value)}</dd>"))
    return Html(f"<dl>{join(parts)}</dl>")


@dataclass(frozen=True)
class ActivationView:
    device_id: str
    hub: str
    path: str  # UNCHANGED | ENROLLMENT | ENROLLMENT_AND_HUB_TWIN
    lifecycle: str  # ENROLLED | ACTIVATED | REGISTERED | DEPROVISIONED
    registered_hub: str
    replayed: bool
    metadata: str = ""  # KEPT | REPLACED | CLEARED ("" or UNSPECIFIED: the service did not say)


def result_page(view: ActivationView) -> Html:
    heading, text = _PATH_TEXT.get(view.path, ("Done", "The activation service accepted the request."))
    if view.metadata == "KEPT":
        text = _KEPT_PATH_TEXT.get(view.path, text)
    metadata_text = _METADATA_TEXT.get(view.metadata)
    replay = (
        Html("<p>This form had been sent before: this is the answer to the first sending.</p>")
        if view.replayed
        else Html("")
    )
    following = _NEXT_TEXT.get(view.path, "")
    body = Html(
        f'<section class="panel ok" role="status" id="outcome"><h2>{escape(heading)}</h2>'
        f"<p>{escape(text)}</p>"
        + (f'<p id="metadata-outcome">{escape(metadata_text)}</p>' if metadata_text else "")
        + f"{replay}"
        + (f'<p id="next">{escape(following)}</p>' if following else "")
        + "</section>"
        + _details(  # what a person reads: the sentences above say what the path and the change were
            {
                "Device ID": view.device_id,
                "Lifecycle": Html(f'<span class="state">{escape(view.lifecycle)}</span>'),
                "Hub": view.hub,
                "Registered hub": view.registered_hub,
            }
        )
        + f'<p><a href="/status?{escape(_query(view.device_id))}">Check its status</a> · '
        '<a href="/">Activate another device</a></p>'
    )
    return layout("Activation result", body, section="activate")  # the outcome is the panel's heading


def _query(device_id: str) -> str:
    return urlencode({"device_id": device_id})


# -------------------------------------------------------------------------------------------- status
@dataclass(frozen=True)
class StatusForm:
    device_id: str = ""
    problem: ServiceProblem | None = None
    local_problems: tuple[FieldProblem, ...] = ()


def status_form_page(form: StatusForm, csrf_token: str) -> Html:
    problems = (*form.local_problems, *(form.problem.fields if form.problem else ()))
    invalid = frozenset(p.name for p in problems if p.name)
    top = _top_panel(form.problem, form.local_problems, _identity_anchor)
    identity = _identity_fields(
        form.device_id, problems, invalid, "The status of a device is shown only with its code."
    )
    body = Html(
        f"""{top}<form method="post" action="/status" autocomplete="off" novalidate>
<input type="hidden" name="csrf_token" value="{escape(csrf_token)}">
{identity}
<div class="actions"><button type="submit">Show status</button></div>
</form>"""
    )
    return layout("Device status", body, section="status", script=True)


@dataclass(frozen=True)
class StatusView:
    device_id: str
    lifecycle: str
    provisioning_status: str
    owner: str  # the OEM that owns the device ("": none yet)
    allocated_hub: str
    registered_hub: str
    hub_device_status: str
    hub_connection_state: str
    last_activity: str
    activated: str
    deactivated: str


_LIFECYCLE_TEXT = {
    "ENROLLED": "Enrolled by the factory and still disabled: it cannot come online until it is activated.",
    "ACTIVATED": "Activated: the device may register with its hub (it has not yet).",
    "REGISTERED": "Registered with its hub.",
    "DEPROVISIONED": "Deactivated: it can neither register nor connect.",
}


def status_page(view: StatusView) -> Html:
    body = Html(
        f'<section class="panel ok" role="status" id="outcome"><h2>{escape(view.lifecycle)}</h2>'
        f"<p>{escape(_LIFECYCLE_TEXT.get(view.lifecycle, ''))}</p></section>"
        + _details(
            {
                "Device ID": view.device_id,
                "Lifecycle": Html(f'<span class="state">{escape(view.lifecycle)}</span>'),
                "Provisioning": view.provisioning_status,
                "Owner": view.owner or "none yet (its first activation claims it)",
                "Allocated hub": view.allocated_hub,
                "Registered hub": view.registered_hub,
                "Hub identity": view.hub_device_status,
                "Connection": view.hub_connection_state,
                "Last activity": view.last_activity or "never",
                "Activated": view.activated,
                "Deactivated": view.deactivated,
            }
        )
        + f'<p><a href="/status?{escape(_query(view.device_id))}">Check again</a> · '
        '<a href="/">Activate a device</a></p>'
    )
    return layout(f"Status of {view.device_id}", body, section="status")


# -------------------------------------------------------------------------------------------- errors
def message_page(title: str, sentence: str) -> Html:
    body = Html(
        f'<section class="panel bad" role="alert" id="problem"><h2>{escape(title)}</h2>'
        f"<p>{escape(sentence)}</p></section>"
        '<p><a href="/">Activate a device</a> · <a href="/status">Device status</a></p>'
    )
    return layout(title, body)


# ------------------------------------------------------------------------------------------- batch
@dataclass(frozen=True)
class BatchForm:
    columns: tuple[str, ...] = ()  # the template's fields, the CSV's further columns
    problem: ServiceProblem | None = None


def batch_form_page(form: BatchForm, csrf_token: str, max_bytes: int) -> Html:
    top = _problem_panel(form.problem, lambda p: None) if form.problem is not None else Html("")
    columns = join(
        (Html(f'<span class="code">{escape(c)}</span>') for c in ("guid", "code", "hub", *form.columns)), ", "
    )
    body = Html(
        f"""{top}<form method="post" action="/batch" enctype="multipart/form-data" autocomplete="off"
 novalidate>
<input type="hidden" name="csrf_token" value="{escape(csrf_token)}">
<label for="shipment">Shipment (CSV)</label>
<input type="file" id="shipment" name="shipment" accept=".csv,text/csv" required
 aria-describedby="shipment-hint">
<p class="hint" id="shipment-hint">A header row, then one device per row. Columns: {columns} (hub may be \\
empty: the default hub). At most {escape(max_bytes // 1024)} KB. Sending the same file again finishes \\
what is left and repeats nothing.</p>
<label for="metadata">Metadata for every row (JSON, optional)</label>
<textarea id="metadata" name="metadata" rows="6" spellcheck="false"\\
{attrs(placeholder=METADATA_PLACEHOLDER)} aria-describedby="batch-metadata-hint"></textarea>
<p class="hint" id="batch-metadata-hint">Instead of the template's columns: the same metadata for every \\
device.</p>
<div class="actions"><button type="submit">Activate the shipment</button></div>
</form>"""
    )
    return layout("Activate a shipment", body, section="batch")


def batch_result_page(results: Sequence[RowResult]) -> Html:
    done = sum(1 for r in results if r.succeeded)
    rows = [
        Html(
            f'<tr class="{"ok" if r.succeeded else "bad"}"><td>{escape(r.line)}</td>'
            f'<td class="code">{escape(r.device_id)}</td><td>{escape(r.outcome)}'
            + (" (earlier)" if r.replayed else "")
            + f'</td><td class="code">{escape(r.reason)}</td><td class="code">{escape(r.field)}</td>'
            f"<td>{escape(r.detail)}</td></tr>"
        )
        for r in results
    ]
    verdict = "ok" if done == len(results) else "bad"
    body = Html(
        f'<section class="panel {verdict}" role="status" id="outcome"><h2>{done} of {len(results)} activated'
        " or already active</h2><p>Rows refused keep their reason; fix them and send the file again "
        "(the rows done are not done twice).</p></section>"
        '<div class="table"><table id="results"><thead><tr><th>Line</th><th>Device</th><th>Outcome</th>'
        f"<th>Reason</th><th>Field</th><th>Detail</th></tr></thead><tbody>{join(rows)}</tbody></table></div>"
        '<p><a href="/batch">Another shipment</a> · <a href="/">Activate one device</a></p>'
    )
    return layout("Shipment result", body, section="batch")
