"""Escaping and small pieces of markup shared by the HTML report's parts.

Every piece of text from a run goes through `e`, which also writes ``://`` as an
entity so that no message can smuggle a live link into the page. Links inside the
page are fragments only (``#r0-i3``, ``#run-ID``): no URL, no external resource.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence

from storyflow.report._model import InstanceReport, Report

FAILED = frozenset({"failed", "cancelled"})
"""Statuses drawn as failures."""


class Raw(str):
    """Markup built here (already escaped): `table` puts it in a cell as it is."""

    __slots__ = ()


def e(text: object) -> str:
    """Escape for HTML text and attributes; ``://`` becomes an entity (no live URL)."""
    return html.escape(str(text), quote=True).replace("://", ":&#47;&#47;")


def cls(text: str) -> str:
    """``text`` as a CSS class name part."""
    return re.sub(r"[^a-z0-9_-]", "", text.lower()) or "unknown"


def badge(status: str) -> Raw:
    return Raw(f'<span class="badge b-{cls(status)}">{e(status)}</span>')


def run_anchor(run_id: str) -> str:
    """The id of a run's section (run ids are letters, digits, ``.``, ``_``, ``-``)."""
    return "run-" + re.sub(r"[^A-Za-z0-9._-]", "_", run_id)


class Anchors:
    """Fragment ids of one run's section: its instances' rows, by position."""

    __slots__ = ("_index", "prefix")

    def __init__(self, prefix: str, report: Report) -> None:
        self.prefix = prefix
        self._index = {inst.id: n for n, inst in enumerate(report.instances)}

    def of(self, instance_id: str) -> str | None:
        n = self._index.get(instance_id)
        return None if n is None else f"{self.prefix}-i{n}"

    def href(self, inst: InstanceReport) -> str | None:
        """Where a click on ``inst`` goes: its child run's section, else its row."""
        if inst.child_run:
            return "#" + run_anchor(inst.child_run)
        found = self.of(inst.id)
        return None if found is None else "#" + found


def table(header: Sequence[str], rows: Iterable[Sequence[str]], right: set[int],
          row_attrs: Sequence[str] = ()) -> str:
    """A table; a cell that is `Raw` goes in as markup, any other is escaped.
    ``row_attrs``: per row, attributes for its ``<tr>`` (already escaped)."""
    head = "".join(f'<th{" class=n" if i in right else ""}>{e(h)}</th>'
                   for i, h in enumerate(header))
    body = []
    for n, row in enumerate(rows):
        attrs = f" {row_attrs[n]}" if n < len(row_attrs) and row_attrs[n] else ""
        cells = "".join(
            f'<td{" class=n" if i in right else ""}>{c if isinstance(c, Raw) else e(c)}</td>'
            for i, c in enumerate(row)
        )
        body.append(f"<tr{attrs}>{cells}</tr>")
    return (f"<div class=scroll><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")
