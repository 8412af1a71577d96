"""`lorachat feedback report`: the ranking's figures as tables, in the terminal and as a page like eval's."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..evaluate.report import html_page, html_table
from ..files import write_text_atomic

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows


def _share(estimate: dict[str, Any]) -> str:
    if estimate["value"] is None:
        return "-"
    low, high = estimate["ci95"]
    return f"{100 * estimate['value']:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"


def tables(figures: dict[str, Any]) -> list[Table]:
    """The report's tables, shared by the terminal and the HTML page."""
    votes = [[m["model"], str(m["exchanges"]), str(m["up"]), str(m["down"]), _share(m["up_rate"]), str(m["edits"]),
              str(m["compared"])] for m in figures["models"]]
    out: list[Table] = [("Votes per model", ["model", "replies", "up", "down", "up rate [95%]", "edits",
                                             "side by side"], votes)]
    if figures["pairs"]:
        out.append(("Win rate against each other model (side by side; a tie counts half)",
                    ["model", "against", "won/tied/lost", "win rate [95%]", ""],
                    [[p["model"], p["other"], f"{p['wins']}/{p['ties']}/{p['losses']}", _share(p["win_rate"]),
                      p.get("note", "")] for p in figures["pairs"]]))
    if figures["ranking"]:
        out.append(("Bradley-Terry ranking (Elo scale: +400 = 10:1 odds; bootstrap 95% interval)",
                    ["rank", "model", "score [95%]", "votes"],
                    [[str(r["rank"]), r["model"], f"{r['score']:.0f} [{r['ci95'][0]:.0f}, {r['ci95'][1]:.0f}]",
                      str(r["compared"])] for r in figures["ranking"]]))
    return out


def headline(figures: dict[str, Any]) -> str:
    v = figures["votes"]
    return (f"{v['ratings']} rated replies, {v['edits']} edits, {v['side_by_side']} side-by-side votes "
            f"over {sum(m['exchanges'] for m in figures['models'])} recorded replies")


def print_report(figures: dict[str, Any], console: Any) -> None:
    from rich.table import Table as RichTable

    console.print(headline(figures))
    for title, header, rows in tables(figures):
        table = RichTable(title=title, title_justify="left")
        for name in header:
            table.add_column(name)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in figures["notes"]:
        console.print(f"note: {note}", markup=False)


def to_html(figures: dict[str, Any]) -> str:
    body = [f"<h1>Feedback</h1><p>{html.escape(headline(figures))}</p>"]
    for title, header, rows in tables(figures):
        body.append(f"<h2>{html.escape(title)}</h2>{html_table(header, rows)}")
    if figures["notes"]:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in figures["notes"]) + "</ul>")
    if figures["skipped"]:
        body.append("<h2>Lines skipped</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in figures["skipped"])
                    + "</ul>")
    return html_page("lorachat feedback", "".join(body))


def write_html(figures: dict[str, Any], path: Path) -> None:
    write_text_atomic(Path(path), to_html(figures))
