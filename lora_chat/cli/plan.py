"""`lorachat plan`: memory and time of a recipe's run on a GPU, before the run."""

from __future__ import annotations

import json

import click

from .main import console, main, recipe_arg, report_errors, set_option


@main.command()
@recipe_arg
@set_option
@click.option("--gpu", metavar="NAME", help="A card (e.g. 'RTX 4090', 'A100 80GB', H100); default: the smallest that fits.")
@click.option("--chars-per-token", type=click.FloatRange(min=0.5), default=4.0, show_default=True,
              help="Used when the base's folder has no tokenizer (config.json only).")
@click.option("--utilisation", type=click.FloatRange(min=0.01, max=1.0),
              help="Share of the card's bf16 peak the run reaches (default: 0.40 LoRA, 0.35 QLoRA, 0.20 8-bit).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: peak_memory_gib, fits, breakdown, tokens_per_s, "
                                                       "hours, steps, suggestions, gpus.")
@report_errors
def plan(recipe: str, overrides: tuple[str, ...], gpu: str | None, chars_per_token: float,
         utilisation: float | None, as_json: bool) -> None:
    """Estimate peak GPU memory, fit and time of RECIPE's run from config.json alone (no weights)."""
    from ..plan import make_plan, print_plan

    result = make_plan(recipe, overrides, gpu, chars_per_token, utilisation)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        print_plan(result, console)
