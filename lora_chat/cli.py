"""The `lorachat` command: thin. Each command parses, calls one function, maps the result to an exit code.

Exit codes: 0 ok, 2 bad input (recipe, data, options), 1 a run that failed, 130/143 interrupted.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

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


if __name__ == "__main__":
    main()
