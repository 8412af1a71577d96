"""The `lorachat` command: thin. Each command parses, calls one function, maps the result to an exit code.

Exit codes: 0 ok, 2 bad input (recipe, data, options), 1 a run that failed, 130/143 interrupted.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console

from . import __version__
from .errors import LorachatError

console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _report_errors(command: Callable) -> Callable:
    """One line per problem on stderr, no traceback unless --debug."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except LorachatError as err:
            if debug:
                raise
            for line in str(err).splitlines():
                err_console.out(f"error: {line}")
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            err_console.out("interrupted")
            sys.exit(130)
        except Exception as err:  # an unexpected failure is still one line; --debug shows where
            if debug:
                raise
            err_console.out(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)")
            sys.exit(1)

    return wrapper


_set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a recipe key, e.g. --set training.lr=1e-4 (repeatable).")
_recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorachat")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """LoRA/QLoRA fine-tuning of chat models: one adapter per domain or language."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # Per-tensor "Loading weights" bars from transformers would bury lorachat's own progress output.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes warns on import (via peft) that an optional CPU kernel package is missing; its
    # fallback works, and the warning would sit above every command's output.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # PEFT 0.21 still reads transformers' old attribute names; the warning is theirs to fix, not the user's.
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)


@main.command()
@_recipe_arg
@_set_option
@_report_errors
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check a recipe and all its data; show lengths, drops and what gets trained. Exit 0 usable, 2 not."""
    from .validate import print_report, problems_text, validate as run_validate

    result = run_validate(recipe, overrides)
    print_report(result, console)
    if result.problems:
        err_console.out(problems_text(result))
    if not result.usable:
        if not result.problems:
            err_console.out("error: no usable training rows")
        sys.exit(2)
    console.print("[green]usable[/]")


@main.command()
@_recipe_arg
@_set_option
@click.option("--limit", "-n", default=3, show_default=True, type=click.IntRange(min=1),
              help="How many samples to show.")
@click.option("--split", type=click.Choice(["train", "eval"]), default="train", show_default=True,
              help="Which split to show.")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object per sample: {"input_ids": [...], "labels": [...]} (labels -100 = no loss).')
@_report_errors
def preview(recipe: str, overrides: tuple[str, ...], limit: int, split: str, as_json: bool) -> None:
    """Show samples as the model sees them: trained tokens highlighted, masked ones dim."""
    from .preview import json_lines, preview_samples, print_samples

    samples, tokenizer = preview_samples(recipe, overrides, limit, split)
    if as_json:
        for line in json_lines(samples):
            click.echo(line)
    else:
        print_samples(samples, tokenizer, console)


@main.command(name="eval")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Held-out data file (repeatable: adapter x dataset matrix). Default: each adapter's eval split.")
@click.option("--base", help="Base model (hub id or folder). Default: the one the first adapter was trained on.")
@click.option("--max-samples", type=click.IntRange(min=1), help="Evaluate at most N conversations per dataset.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Longest generated reply.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 = greedy decoding; above 0 = sampling, seeded by --seed.")
@click.option("--seed", default=0, show_default=True, help="Seed for sampling and bootstrap intervals.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Prompts per generate call.")
@click.option("--judge-url", help="OpenAI-compatible endpoint for a pairwise judge (e.g. http://127.0.0.1:8000/v1).")
@click.option("--judge-model", help="Model name to ask the judge endpoint for.")
@click.option("--out", default="eval", show_default=True, type=click.Path(file_okay=False),
              help="Directory for report.json, report.md and report.html.")
@_report_errors
def eval_(adapters, data, base, max_samples, max_new_tokens, temperature, seed, batch_size, judge_url,
          judge_model, out) -> None:
    """Base vs adapters on the same held-out conversations: loss, generation metrics, judge, reports."""
    from rich.table import Table

    from .evaluate.generate import Decoding
    from .evaluate.metrics import PRIMARY
    from .evaluate.report import summary_table
    from .evaluate.run import EvalOptions, run_eval

    decoding = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size)
    options = EvalOptions(tuple(map(Path, adapters)), tuple(map(Path, data)), base, max_samples, decoding,
                          judge_url, judge_model, Path(out), seed)
    report = run_eval(options, say=lambda line: err_console.out(line))
    header, rows = summary_table(report, intervals=False)
    table = Table(*header, title=f"pooled over all datasets; loss with bootstrap 95% CI; "
                                 f"wins on {PRIMARY}; intervals for all: {options.out / 'report.md'}")
    for row in rows:
        table.add_row(*row)
    console.print(table)


@main.command()
@_recipe_arg
@_set_option
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in output.dir.")
@click.option("--overwrite", is_flag=True, help="Replace an adapter (or unfinished run) already in output.dir.")
@click.option("--dry-run", is_flag=True, help="Resolve everything and print the plan; train and write nothing.")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(min=1),
              help="Run as N processes (DDP via torch.distributed / accelerate).")
@_report_errors
def finetune(recipe: str, overrides: tuple[str, ...], resume: bool, overwrite: bool, dry_run: bool,
             processes: int) -> None:
    """Train a LoRA/QLoRA adapter from RECIPE. Exit 0 done, 2 bad input, 1 failed, 130/143 interrupted."""
    from .train import Options, finetune as run_finetune

    run_finetune(recipe, overrides, Options(resume, overwrite, dry_run, processes), console)


if __name__ == "__main__":
    main()
