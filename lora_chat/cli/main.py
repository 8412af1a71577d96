"""The `lorachat` group and what every command shares: one-line errors, --set, the recipe argument.

Each command module (inspect, finetune, eval, ...) is thin: it parses, calls one function, maps the result
to an exit code.

Exit codes: 0 ok, 2 bad input (recipe, data, options), 1 a run that failed, 130/143 interrupted.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable

import click
from rich.console import Console, ConsoleDimensions

from .. import __version__
from ..errors import LorachatError

UNBOUNDED_WIDTH = 1000  # columns when printing into a file or pipe: nothing there wraps lines for us


class _Console(Console):
    """A rich console that, when its stream is not a terminal (a log file, `| tee`, CI), prints tables and lines
    whole instead of cutting them at rich's default 80 columns (`drop…`, `[3.2…`)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(UNBOUNDED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


console = _Console()
err_console = _Console(stderr=True, highlight=False, soft_wrap=True)


def report_errors(command: Callable) -> Callable:
    """One line per problem on stderr, no traceback unless --debug."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except LorachatError as err:
            if debug:
                raise
            # In a multi-process run every process meets the same bad input or stop (a NaN is shared across
            # ranks): the first process says it once.
            if int(os.environ.get("RANK", "0")) == 0:
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


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a recipe key, e.g. --set training.lr=1e-4 (repeatable).")
recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))


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
