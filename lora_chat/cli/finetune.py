"""`lorachat finetune`: train an adapter from a recipe."""

from __future__ import annotations

import click

from .main import console, main, report_errors, set_option


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@set_option
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in output.dir.")
@click.option("--overwrite", is_flag=True, help="Replace an adapter (or unfinished run) already in output.dir.")
@click.option("--dry-run", is_flag=True, help="Resolve everything and print the plan; train and write nothing.")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(min=1),
              help="Run as N local processes (DDP via torch.distributed / accelerate). Under accelerate launch "
                   "or torchrun, leave it out: each launched process runs `finetune` as is.")
@report_errors
def finetune(recipes: tuple[str, ...], overrides: tuple[str, ...], resume: bool, overwrite: bool, dry_run: bool,
             processes: int) -> None:
    """Train a LoRA/QLoRA adapter from RECIPE; several RECIPES train together on one loaded base, each to its own
    output.dir (docs/joint-training.md). Exit 0 done, 2 bad input, 1 failed, 130/143 interrupted."""
    from ..recipe import load_recipe
    from ..train import Options, finetune as run_finetune

    if len(recipes) > 1:
        from ..train.joint import finetune_joint

        loaded_all = [load_recipe(path, list(overrides)) for path in recipes]
        finetune_joint(loaded_all, Options(resume, overwrite, dry_run, processes, tuple(overrides)), console)
        return
    loaded = load_recipe(recipes[0], list(overrides))
    if loaded.recipe.training.method != "sft":
        from ..train.preference import finetune as run_finetune  # dpo / orpo: pairs instead of replies
    run_finetune(loaded, Options(resume, overwrite, dry_run, processes, tuple(overrides)), console)
