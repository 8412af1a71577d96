"""`lorachat eval`: the base and adapters side by side on held-out data."""

from __future__ import annotations

from pathlib import Path

import click

from .main import console, err_console, main, report_errors


@main.command(name="eval")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Held-out data file (repeatable: adapter x dataset matrix). Default: each adapter's eval split.")
@click.option("--base", help="Base model (hub id or folder). Default: the one the first adapter was trained on.")
@click.option("--model", "models", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A merged model folder (e.g. from `lorachat merge`) compared as one more model (repeatable).")
@click.option("--max-samples", type=click.IntRange(min=1), help="Evaluate at most N conversations per dataset.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Longest generated reply.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 = greedy decoding; above 0 = sampling, seeded by --seed.")
@click.option("--seed", default=0, show_default=True, help="Seed for sampling and bootstrap intervals.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Rows per generation batch (rows of every model share batches).")
@click.option("--fast", is_flag=True,
              help="Stock attention kernels: a little faster, but a greedy reply may then depend on the batch "
                   "(the report says so).")
@click.option("--judge-url", help="OpenAI-compatible endpoint for a pairwise judge (e.g. http://127.0.0.1:8000/v1).")
@click.option("--judge-model", help="Model name to ask the judge endpoint for.")
@click.option("--force", is_flag=True,
              help="Load adapters trained on another id or revision of a base with the same shapes (a warning).")
@click.option("--general", type=click.Path(exists=True, dir_okay=False),
              help="General held-out data (any format lorachat reads) for the forgetting check. Default: the shipped "
                   "chatterbot-corpus set in each adapter's language, which no lorachat recipe trains on.")
@click.option("--general-rows", default=64, show_default=True, type=click.IntRange(min=2),
              help="General conversations scored per model (the forgetting check's cost).")
@click.option("--no-general", is_flag=True, help="Skip the forgetting check on general data.")
@click.option("--pairs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Preference file (prompt, chosen, rejected) for held-out pair accuracy (repeatable). Default: the "
                   "preference rows of the eval data, if any.")
@click.option("--out", default="eval", show_default=True, type=click.Path(file_okay=False),
              help="Directory for report.json, report.md and report.html.")
@report_errors
def eval_(adapters, data, base, models, max_samples, max_new_tokens, temperature, seed, batch_size, fast, judge_url,
          judge_model, force, general, general_rows, no_general, pairs, out) -> None:
    """Base vs adapters on the same held-out conversations: loss, generation metrics, judge, reports."""
    from rich.table import Table

    from ..evaluate.generate import Decoding
    from ..evaluate.metrics import PRIMARY
    from ..evaluate.preference import table as pairs_table
    from ..evaluate.report import forgetting_flags, forgetting_table, summary_table
    from ..evaluate.run import EvalOptions, run_eval

    decoding = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size)
    options = EvalOptions(tuple(map(Path, adapters)), tuple(map(Path, data)), base, tuple(map(Path, models)),
                          max_samples, decoding, fast, judge_url, judge_model, Path(out), seed, force,
                          general=Path(general) if general else None, no_general=no_general, general_rows=general_rows,
                          pairs=tuple(map(Path, pairs)))
    report = run_eval(options, say=lambda line: err_console.out(line), console=err_console)
    header, rows = summary_table(report, intervals=False)
    table = Table(*header, title=f"pooled over all datasets; loss with bootstrap 95% CI; "
                                 f"wins on {PRIMARY}; intervals for all: {options.out / 'report.md'}")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if "pairs" in report:
        table = Table(*pairs_table(report)[0], title="pair accuracy: chosen more likely than rejected (95% CI)")
        for row in pairs_table(report)[1]:
            table.add_row(*row)
        console.print(table)
    if "forgetting" in report:
        header, rows = forgetting_table(report, intervals=False)
        table = Table(*header, title="learned (own data) vs forgot (general data: "
                                     f"{', '.join(s['name'] for s in report['forgetting']['sets'])}); + = better, "
                                     "general loss change + = worse")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        for line in forgetting_flags(report):
            console.print(f"[yellow]warning:[/] {line}")
