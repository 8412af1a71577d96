"""`lorachat preview`: the first samples exactly as the trainer gets them, token by token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

from rich.console import Console
from rich.text import Text

from .encoding import encode_split
from .inputs import load_inputs
from .recipe import LoadedRecipe
from .templates import IGNORE, Encoded


def preview_samples(loaded: LoadedRecipe, limit: int = 3,
                    split: Literal["train", "eval"] = "train") -> tuple[list[Encoded], object]:
    """The first `limit` usable samples of a split, in data order, and the tokenizer that made them."""
    inputs = load_inputs(loaded)
    conversations = inputs.data.train if split == "train" else inputs.data.eval
    samples: list[Encoded] = []
    # Encode a little at a time: a preview of 3 samples should not tokenize the whole data set.
    step = max(limit, 16)
    for start in range(0, len(conversations), step):
        encoded, _ = encode_split(conversations[start:start + step], inputs.template, inputs.loaded)
        samples += encoded
        if len(samples) >= limit:
            break
    return samples[:limit], inputs.tokenizer


def json_lines(samples: list[Encoded]) -> Iterator[str]:
    for s in samples:
        yield json.dumps({"input_ids": s.input_ids, "labels": s.labels})


def print_samples(samples: list[Encoded], tokenizer, console: Console) -> None:
    for n, s in enumerate(samples, 1):
        console.rule(f"sample {n}  {s.origin.file}:{s.origin.line}  "
                     f"{len(s.input_ids)} tokens, {s.trained} trained")
        console.print(_highlight(s, tokenizer, plain=not console.is_terminal))
    if console.is_terminal:
        console.print("[bold green]trained[/]  [dim]masked (no loss)[/]")
    else:
        console.print("⟦trained⟧  rest masked (no loss)")


def _highlight(sample: Encoded, tokenizer, plain: bool) -> Text:
    """Trained runs in bold green and the rest dim; without colours (a pipe), trained runs go in ⟦ ⟧."""
    text = Text()
    runs: list[tuple[bool, list[int]]] = []
    for token_id, label in zip(sample.input_ids, sample.labels):
        trained = label != IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token_id)
        else:
            runs.append((trained, [token_id]))
    for trained, ids in runs:
        piece = tokenizer.decode(ids)
        if plain:
            text.append(f"⟦{piece}⟧" if trained else piece)
        else:
            text.append(piece, style="bold green" if trained else "dim")
    return text
