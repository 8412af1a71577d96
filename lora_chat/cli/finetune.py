"""`lorachat finetune`: train an adapter from a recipe."""

from __future__ import annotations

import click

from .main import console, main, recipe_arg, report_errors, set_option


@main.command()
@recipe_arg
@set_option
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in output.dir.")
@click.option("--overwrite", is_flag=True, help="Replace an adapter (or unfinished run) already in output.dir.")
@click.option("--dry-run", is_flag=True, help="Resolve everything and print the plan; train and write nothing.")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(min=1),
              help="Run as N local processes (DDP via torch.distributed / accelerate). Under accelerate launch "
                   "or torchrun, leave it out: each launched process runs `finetune` as is.")
@report_errors
def finetune(recipe: str, overrides: tuple[str, ...], resume: bool, overwrite: bool, dry_run: bool,
             processes: int) -> None:
    """Train a LoRA/QLoRA adapter from RECIPE. Exit 0 done, 2 bad input, 1 failed, 130/143 interrupted."""
    from ..recipe import load_recipe
    from ..train import Options, finetune as run_finetune

    loaded = load_recipe(recipe, list(overrides))
    run_finetune(loaded, Options(resume, overwrite, dry_run, processes, tuple(overrides)), console)
