"""`lorachat feedback report|export`: what people said about a server's replies (recorded with `serve --record`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .main import console, err_console, main, report_errors

record_dir = click.argument("folder", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))


@main.group()
def feedback() -> None:
    """Report on and export the exchanges and feedback a server recorded (lorachat serve ... --record DIR)."""


@feedback.command()
@record_dir
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT",
              help="Also write the report as a self-contained HTML page.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of tables.")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap behind the ranking's intervals.")
@report_errors
def report(folder: Path, html_out: Path | None, as_json: bool, seed: int) -> None:
    """Per model: votes, human win rate against each other model (95% interval), a Bradley-Terry ranking."""
    from ..feedback.ranking import rank
    from ..feedback.report import print_report, write_html
    from ..feedback.store import read_records

    figures = rank(read_records(folder), seed=seed)
    if as_json:
        click.echo(json.dumps(figures, indent=2, ensure_ascii=False))
    else:
        print_report(figures, console)
    if html_out is not None:
        write_html(figures, html_out)
        err_console.out(f"wrote {html_out}")


@feedback.command()
@record_dir
@click.option("--sft", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.jsonl",
              help="SFT rows (format: messages): edited replies and up-voted ones.")
@click.option("--pairs", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.jsonl",
              help="Preference pairs (format: preference): chosen vs rejected replies to the same prompt.")
@report_errors
def export(folder: Path, sft: Path | None, pairs: Path | None) -> None:
    """Training data from the feedback: personal data masked, duplicates dropped, every count printed."""
    from ..feedback.export import export as run_export

    for line in run_export(folder, sft=sft, pairs=pairs).lines():
        console.print(line, markup=False)
