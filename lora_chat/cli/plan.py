"""`lorachat plan`: memory and time of a recipe's run on a GPU, before the run."""

from __future__ import annotations

import json

import click

from .main import console, main, report_errors, set_option


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@set_option
@click.option("--gpu", metavar="NAME", help="A card (e.g. 'RTX 4090', 'A100 80GB', H100); default: the smallest that fits.")
@click.option("--chars-per-token", type=click.FloatRange(min=0.5), default=4.0, show_default=True,
              help="Used when the base's folder has no tokenizer (config.json only).")
@click.option("--utilisation", type=click.FloatRange(min=0.01, max=1.0),
              help="Share of the card's bf16 peak the run reaches (default: 0.40 LoRA, 0.35 QLoRA, 0.20 8-bit).")
@click.option("--max-length", "max_length", is_flag=True,
              help="Also find, for each card, the longest row (tokens) whose micro-batch fits.")
@click.option("--host-ram", type=click.FloatRange(min=0.0), metavar="GIB",
              help="Free host memory offloaded checkpoints may use (default: what this machine has available).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: peak_memory_gib, fits, breakdown, tokens_per_s, "
                                                       "hours, steps, suggestions, gpus.")
@report_errors
def plan(recipes: tuple[str, ...], overrides: tuple[str, ...], gpu: str | None, chars_per_token: float,
         utilisation: float | None, max_length: bool, host_ram: float | None, as_json: bool) -> None:
    """Estimate peak GPU memory, fit and time of RECIPE's run from config.json alone (no weights); several
    RECIPES: their joint run (one base, every adapter, the mixed micro-batch; docs/joint-training.md)."""
    from ..plan import make_plan, print_plan

    if len(recipes) > 1:
        from ..plan.joint import make_joint_plan, print_joint_plan

        joint = make_joint_plan(list(recipes), overrides, gpu, chars_per_token=chars_per_token,
                                utilisation=utilisation, host_ram_gib=host_ram)
        if as_json:
            click.echo(json.dumps(joint.to_json(), indent=2))
        else:
            print_joint_plan(joint, console)
        return
    result = make_plan(recipes[0], overrides, gpu, chars_per_token, utilisation, max_length=max_length,
                       host_ram_gib=host_ram)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        print_plan(result, console)
