"""Escaped-by-default HTML: every value put into a page is escaped unless it already is ``Html`` (markup this
package built itself).  ``render(template, **values)`` fills a ``string.Template``."""

from __future__ import annotations

import html
from collections.abc import Iterable
from string import Template


class Html(str):
    """Trusted markup (built by this package from escaped parts)."""

    __slots__ = ()


def escape(value: object) -> Html:
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def render(template: Template, **values: object) -> Html:
    return Html(template.substitute({k: escape(v) for k, v in values.items()}))


def join(parts: Iterable[object], sep: str = "") -> Html:
    return Html(sep.join(escape(p) for p in parts))


def attrs(**values: object) -> Html:
    """`` name="value"`` pairs (``True`` -> bare attribute, ``False``/``None`` -> left out)."""
    out = []
    for name, value in values.items():
        name = name.rstrip("_").replace("_", "-")
        if value is True:
            out.append(f" {name}")
        elif value is not False and value is not None:
            out.append(f' {name}="{escape(value)}"')
    return Html("".join(out))
