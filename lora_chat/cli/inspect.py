"""`lorachat validate` and `lorachat preview`: look at a recipe and its data before training."""

from __future__ import annotations

import sys

import click

from .main import console, err_console, main, recipe_arg, report_errors, set_option


@main.command()
@recipe_arg
@set_option
@report_errors
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check a recipe and all its data; show lengths, drops and what gets trained. Exit 0 usable, 2 not."""
    from ..recipe import load_recipe
    from ..validate import print_report, problems_text, validate as run_validate

    result = run_validate(load_recipe(recipe, list(overrides)))
    print_report(result, console)
    if result.problems:
        err_console.out(problems_text(result))
    if not result.usable:
        if not result.problems:
            err_console.out("error: no usable training rows")
        sys.exit(2)
    console.print("[green]usable[/]")


@main.command()
@recipe_arg
@set_option
@click.option("--limit", "-n", default=3, show_default=True, type=click.IntRange(min=1),
              help="How many samples to show.")
@click.option("--split", type=click.Choice(["train", "eval"]), default="train", show_default=True,
              help="Which split to show.")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object per sample: {"input_ids": [...], "labels": [...]} (labels -100 = no loss).')
@report_errors
def preview(recipe: str, overrides: tuple[str, ...], limit: int, split: str, as_json: bool) -> None:
    """Show samples as the model sees them: trained tokens highlighted, masked ones dim."""
    from ..preview import json_lines, preview_samples, print_samples
    from ..recipe import load_recipe

    samples, tokenizer = preview_samples(load_recipe(recipe, list(overrides)), limit, split)
    if as_json:
        for line in json_lines(samples):
            click.echo(line)
    else:
        print_samples(samples, tokenizer, console)
