"""The portal's only static files: one stylesheet and one small script (served from /static/, so the CSP
needs no 'unsafe-inline').  The script only helps: it takes the activation code a label's QR code carries
in the URL fragment (``/?device=GUID#code=CODE``) into the form and removes the fragment from the address
bar (``history.replaceState``: the code is never sent to a server, never in a log or a Referer, and not
left in the browser's history); it checks and pretty-prints the metadata JSON, and it keeps a form from
being sent while a code cannot be a code (``provkit.activation_code.normalise``'s rules) or the JSON is not
JSON, saying why under the field; the activation service still validates everything."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

CSS = """\
:root { color-scheme: light; --ink: #1d2430; --muted: #5b6575; --line: #cfd6e0; --accent: #0b5cad;
  --ok: #1a7f37; --bad: #b42318; --bg: #f6f8fa; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--ink); background: var(--bg); }
header { background: #fff; border-bottom: 1px solid var(--line); }
header .bar, main { max-width: 42rem; margin: 0 auto; padding: 0.75rem 1rem; }
header .bar { display: flex; flex-wrap: wrap; gap: 0.5rem 1.25rem; align-items: baseline; }
header strong { font-size: 1.1rem; margin-right: auto; }
nav a { color: var(--accent); text-decoration: none; padding: 0.25rem 0; }
nav a[aria-current] { font-weight: 600; border-bottom: 2px solid var(--accent); }
h1 { font-size: 1.4rem; margin: 0.75rem 0; }
form { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; }
label { display: block; font-weight: 600; margin: 0.9rem 0 0.25rem; }
label:first-of-type { margin-top: 0; }
.hint { color: var(--muted); font-size: 0.9rem; margin: 0.2rem 0 0; }
input, select, textarea { width: 100%; font: inherit; padding: 0.6rem; border: 1px solid var(--line);
  border-radius: 6px; background: #fff; color: var(--ink); }
textarea { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.9rem;
  min-height: 14rem; resize: vertical; }
[aria-invalid="true"] { border-color: var(--bad); outline: 2px solid rgba(180, 35, 24, 0.2); }
.check { display: flex; gap: 0.5rem; align-items: center; font-weight: 400; }
.check input { width: auto; }
.field-error { color: var(--bad); font-size: 0.9rem; margin: 0.25rem 0 0; }
.field-error p { margin: 0; }
.field-error:empty { display: none; }
.row { display: flex; gap: 0.5rem; align-items: center; flex-wrap: wrap; margin-top: 0.4rem; }
button { font: inherit; border: 0; border-radius: 6px; padding: 0.7rem 1.2rem; cursor: pointer;
  background: var(--accent); color: #fff; }
button.secondary { background: #e8edf3; color: var(--ink); padding: 0.4rem 0.8rem; }
.actions { margin-top: 1.2rem; }
.actions button { width: 100%; }
.panel { border-radius: 8px; padding: 0.9rem 1rem; margin: 0 0 1rem; background: #fff;
  border: 1px solid var(--line); border-left-width: 6px; }
.panel.ok { border-left-color: var(--ok); }
.panel.bad { border-left-color: var(--bad); }
.panel h2 { font-size: 1.15rem; margin: 0 0 0.3rem; }
.panel p, .panel ul { margin: 0.3rem 0; }
.code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85rem; color: var(--muted);
  overflow-wrap: anywhere; }
dl { display: grid; grid-template-columns: minmax(7rem, max-content) 1fr; gap: 0.35rem 1rem; margin: 0;
  background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.state { font-weight: 700; letter-spacing: 0.03em; }
#metadata-check.ok { color: var(--ok); }
#metadata-check.bad { color: var(--bad); }
.req { color: var(--bad); font-weight: 700; }
fieldset.template { border: 1px solid var(--line); border-radius: 6px; margin: 1rem 0 0;
  padding: 0.2rem 0.8rem 0.8rem; }
fieldset.template legend { font-weight: 700; padding: 0 0.3rem; }
details.advanced { margin-top: 1rem; }
details.advanced summary { cursor: pointer; color: var(--accent); }
.table { overflow-x: auto; background: #fff; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { text-align: left; padding: 0.35rem 0.5rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
tr.bad td { color: var(--bad); }
footer { max-width: 42rem; margin: 1rem auto; padding: 0 1rem; color: var(--muted); font-size: 0.85rem; }
@media (max-width: 30rem) { dl { grid-template-columns: 1fr; } dd { margin-bottom: 0.4rem; } }
"""

JS = """\
"use strict";
(function () {
  var field = document.getElementById("activation_code");
  if (!field || location.hash.length < 2) { return; }
  var code = new URLSearchParams(location.hash.slice(1)).get("code");
  if (code === null) { return; }
  field.value = code.trim();
  history.replaceState(history.state, "", location.pathname + location.search);
})();
(function () {
  // What the page checks before anything is sent (the activation service still checks everything): a
  // code that cannot be a code (provkit.activation_code.normalise) and metadata that is not JSON.  A
  // field's problem is said in one place, under the field (where the server's answer goes too).
  var ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
  var ALIASES = {O: "0", I: "1", L: "1"};
  var CODE_LENGTH = 16;
  var NOT_A_CODE = "That is not an activation code: it has 16 letters and digits, printed in four " +
    "groups like 7K3M-Q9XD-2HPA-W4RT.";
  var NO_CODE = "Type the activation code printed on the label.";
  var form = document.querySelector("form[method=post]");
  var code = document.getElementById("activation_code");
  var area = document.getElementById("metadata");
  var note = document.getElementById("metadata-check");
  var button = document.getElementById("format-json");
  if (!form) { return; }

  function codeProblem(text) {
    var count = 0;
    var upper = text.toUpperCase();
    if (upper.trim() === "") { return NO_CODE; }
    for (var i = 0; i < upper.length; i++) {
      var c = upper.charAt(i);
      if (c === " " || c === "-" || c === "\\t") { continue; }
      c = ALIASES[c] || c;
      if (ALPHABET.indexOf(c) < 0) { return NOT_A_CODE; }
      count += 1;
    }
    return count === CODE_LENGTH ? "" : NOT_A_CODE;
  }
  function jsonProblem(text) {
    if (text.trim() === "") { return ""; }
    try {
      JSON.parse(text);
      return "";
    } catch (err) {
      return "Not valid JSON: " + err.message;
    }
  }
  function errorBox(field) { return document.getElementById(field.id + "-error"); }
  function say(field, message) {
    var box = errorBox(field);
    if (box) { box.textContent = message; }
    if (message) {
      field.setAttribute("aria-invalid", "true");
    } else {
      field.removeAttribute("aria-invalid");
    }
  }
  function checkMetadata() {
    var problem = jsonProblem(area.value);
    say(area, problem);
    if (note) {
      note.textContent = problem ? "" :
        area.value.trim() === "" ? "Empty: the device keeps the metadata it has." : "Valid JSON.";
      note.className = problem ? "hint" : area.value.trim() === "" ? "hint" : "hint ok";
    }
    return problem;
  }
  if (code) {
    code.addEventListener("input", function () { say(code, ""); });
  }
  if (area) {
    area.addEventListener("input", checkMetadata);
    var box = errorBox(area);
    if (!box || box.textContent === "") { checkMetadata(); }  // else the server's answer stays, alone
    if (button) {
      button.hidden = false;
      button.addEventListener("click", function () {
        if (checkMetadata() === "" && area.value.trim() !== "") {
          area.value = JSON.stringify(JSON.parse(area.value), null, 2);
        }
      });
    }
  }
  form.addEventListener("submit", function (event) {
    var first = null;
    if (code) {
      var problem = codeProblem(code.value);
      say(code, problem);
      if (problem) { first = code; }
    }
    if (area && checkMetadata() && first === null) { first = area; }
    if (first === null) { return; }
    event.preventDefault();  // nothing is sent: the field says why
    var folded = first.closest("details");
    if (folded) { folded.open = true; }
    first.focus();
  });
})();
"""

ICON = """\
<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">\
<rect width="32" height="32" rx="6" fill="#0b5cad"/>\
<path d="M9 17l5 5 9-11" stroke="#fff" stroke-width="3.5" fill="none" stroke-linecap="round"/></svg>
"""


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'


ASSETS = {
    "portal.css": Asset(CSS.encode(), "text/css"),
    "portal.js": Asset(JS.encode(), "text/javascript"),
    "favicon.svg": Asset(ICON.encode(), "image/svg+xml"),
}
