"""`lorachat merge` (into the base, or several adapters into one) and `lorachat export` (GGUF for llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import LorachatError, Where
from .main import console, err_console, main, report_errors

_INTO_BASE_ONLY = ("dtype", "samples", "tolerance")
_COMBINE_ONLY = ("method", "weights", "density", "seed")


def _say(line: str) -> None:
    err_console.out(line)


def _weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise LorachatError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.6,0.4",
                            Where(field="--weights")) from None


@main.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Folder to write (a merged model, or the combined "
              "adapter). Written beside itself and renamed into place when whole.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is whole).")
@click.option("--base", help="Base model (hub id or folder). Default: the one the adapters were trained on.")
@click.option("--dtype", help="Into the base: float32, bfloat16 or float16. Default: the base's own dtype "
              "(config.json), else float32.")
@click.option("--samples", type=click.IntRange(min=1), help="Into the base: how many of the adapter's eval rows "
              "the logit check runs on (default 4).")
@click.option("--tolerance", type=click.FloatRange(min=0), help="Into the base: the largest max |logit diff| "
              "accepted (default by dtype: float32 1e-3, float16 1.0, bfloat16 4.0).")
@click.option("--method", help="Combine: linear, cat, svd, ties, dare_ties, dare_linear or magnitude_prune "
              "(PEFT's add_weighted_adapter).")
@click.option("--weights", help="Combine: one weight per adapter, comma-separated, e.g. 0.6,0.4. Default: 1/N each.")
@click.option("--density", type=float, help="Combine with ties, dare_* or magnitude_prune: the share of each "
              "adapter's update kept, in (0, 1]. Default 0.5.")
@click.option("--seed", type=int, help="Combine: seed for DARE's random pruning (default 0).")
@click.option("--force", is_flag=True, help="Accept a base other than the one trained on (another model id or "
              "revision) when every shape fits; a warning instead of an error.")
@report_errors
def merge(adapters, out, overwrite, base, dtype, samples, tolerance, method, weights, density, seed, force) -> None:
    """One ADAPTER: merge it into its base, check the logits, write a plain transformers model folder.
    Several: combine them into one adapter with --method. Exit 0 done, 2 bad input, 1 failed check or disk."""
    given = {"dtype": dtype, "samples": samples, "tolerance": tolerance, "method": method, "weights": weights,
             "density": density, "seed": seed}
    if len(adapters) == 1:
        misplaced = [f"--{k}" for k in _COMBINE_ONLY if given[k] is not None]
        if misplaced:
            raise LorachatError(f"{misplaced[0]} combines several adapters; with one ADAPTER, merge puts it into "
                                f"its base", Where(field=misplaced[0]))
        from ..merge import MergeOptions, merge_into_base
        from ..merge.into_base import SAMPLES

        result = merge_into_base(MergeOptions(Path(adapters[0]), Path(out), dtype, base, overwrite,
                                              samples or SAMPLES, tolerance, force), say=_say)
        console.print(f"merged model written to {result.out} ({result.dtype}): max |logit diff| "
                      f"{result.max_abs_diff:.3g}, mean {result.mean_abs_diff:.3g} vs the adapter on its base, "
                      f"{result.samples} samples, tolerance {result.tolerance:g}", soft_wrap=True)
        return
    misplaced = [f"--{k}" for k in _INTO_BASE_ONLY if given[k] is not None]
    if misplaced:
        raise LorachatError(f"{misplaced[0]} applies to merging one adapter into its base, not to combining",
                            Where(field=misplaced[0]))
    if method is None:
        raise LorachatError("combining adapters needs --method: linear, cat, svd, ties, dare_ties, dare_linear or "
                            "magnitude_prune", Where(field="--method"))
    from ..merge import CombineOptions, combine

    written = combine(CombineOptions(tuple(map(Path, adapters)), Path(out), method, _weights(weights), density,
                                     base, overwrite, seed or 0, force), say=_say)
    console.print(f"combined adapter written to {written}", soft_wrap=True)


@main.command()
@click.argument("adapter", type=click.Path(file_okay=False))
@click.option("--format", "format_", default="gguf", show_default=True,
              help="Output format: gguf (a llama.cpp LoRA adapter).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write, e.g. adapter.gguf.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--base", help="Base model (hub id or folder); only its config.json is read. Default: the one the "
              "adapter was trained on.")
@click.option("--force", is_flag=True, help="Accept a base other than the one trained on (another model id or "
              "revision) when every shape fits; a warning instead of an error.")
@report_errors
def export(adapter, format_, out, overwrite, base, force) -> None:
    """Export ADAPTER for llama.cpp / Ollama / llama-cpp-python, and print the Modelfile lines that use it."""
    from ..merge import ExportOptions, export_gguf, modelfile_lines

    result = export_gguf(ExportOptions(Path(adapter), Path(out), format_, base, overwrite, force), say=_say)
    console.print(f"wrote {result.out}: {result.tensors} tensors for llama.cpp's {result.architecture}, "
                  f"alpha {result.alpha:g}", soft_wrap=True)
    console.print("Ollama Modelfile (FROM: a GGUF of the same base):", soft_wrap=True)
    for line in modelfile_lines(result):
        console.print(line, soft_wrap=True, highlight=False)
