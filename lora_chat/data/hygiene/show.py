"""The hygiene report as `validate` prints it: a counts table, then examples, rich in a terminal, whole in a pipe."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ...errors import Where
from .scan import ACROSS, LEAKAGE, WITHIN, Finding, HygieneReport

ROW_NUMBERS = 20  # row numbers listed per PII kind before "... and N more"


def print_hygiene(report: HygieneReport, console: Console, *, dedup: str, language_filter: bool, pii: str,
                  names: dict[str, str]) -> None:
    """Counts per check (and what the recipe's filter does with them), then examples of each.

    `names`: each source's resolved location -> its path as the recipe writes it, so rows read `pkg:...:12`.
    """
    def _at(where: Where | None) -> str:
        if where is None:
            return "-"
        name = names.get(str(where.file), str(where.file))
        return f"{name}:{where.line}" if where.line else name

    table = Table(title="data hygiene", title_justify="left")
    for col in ("check", "rows", "filter"):
        table.add_column(col, justify="right" if col == "rows" else "left")
    exact_filter = "dropped (dedup)" if dedup in ("exact", "near") else "kept (data.dedup: exact drops them)"
    near_filter = "dropped (dedup)" if dedup == "near" else "kept (data.dedup: near drops them)"
    for scope in (WITHIN, ACROSS, LEAKAGE):
        table.add_row(f"exact duplicates, {scope}", str(_count(report.exact, scope)), exact_filter)
    for scope in (WITHIN, ACROSS, LEAKAGE):
        table.add_row(f"near duplicates, {scope}", str(_count(report.near, scope)), near_filter)
    if report.language is not None:
        found = ", ".join(f"{lang} {n}" for lang, n in report.languages_found.most_common())
        table.add_row(f"not in {report.language}" + (f" ({found})" if found else ""), str(report.wrong_language.count),
                      "dropped (language_filter)" if language_filter else "kept (data.language_filter: true drops them)")
    else:
        table.add_row("language", "-", "not checked: set output.language")
    pii_filter = {"report": "kept (data.pii: mask or drop)", "mask": "masked", "drop": "dropped"}[pii]
    for kind in sorted(report.pii):
        table.add_row(f"personal data: {kind}", str(report.pii[kind].count), pii_filter)
    if not report.pii:
        table.add_row("personal data", "0", "")
    console.print(table)
    if report.summary():
        console.print(report.summary())

    for title, tallies in (("exact duplicates", report.exact), ("near duplicates", report.near)):
        for scope in (WITHIN, ACROSS, LEAKAGE):
            if tallies.get(scope) and tallies[scope].count:
                heading = "eval row" if scope == LEAKAGE else "row"
                other = "copies training row" if scope == LEAKAGE else "copies"
                _examples(console, f"{title}, {scope}", tallies[scope].examples, (heading, other, "similarity"), _at)
    if report.wrong_language.count:
        _examples(console, f"not in {report.language}", report.wrong_language.examples, ("row", None, "language"),
                  _at)
    for kind in sorted(report.pii):
        rows = report.pii_rows[kind]
        listed = ", ".join(_at(w) for w in rows[:ROW_NUMBERS])
        more = f" ... and {len(rows) - ROW_NUMBERS} more" if len(rows) > ROW_NUMBERS else ""
        console.print(f"personal data {kind} in {len(rows)} rows: {escape(listed)}{more}")


def _count(tallies: dict, scope: str) -> int:
    return tallies[scope].count if scope in tallies else 0


def _examples(console: Console, title: str, findings: list[Finding], columns: tuple[str, str | None, str],
              _at: Callable[[Where | None], str]) -> None:
    table = Table(title=f"{title}: examples", title_justify="left")
    first, other, detail = columns
    table.add_column(first)
    if other:
        table.add_column(other)
    if any(f.detail for f in findings):
        table.add_column(detail)
    table.add_column("text")
    for f in findings:
        cells = [_at(f.where)] + ([_at(f.other)] if other else []) + ([f.detail] if any(x.detail for x in findings)
                                                                       else []) + [f.text]
        table.add_row(*(escape(c) for c in cells))
    console.print(table)
