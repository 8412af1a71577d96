"""Conversations -> token ids and labels, with `too_long` applied and every dropped row counted.

This is the one place conversations become token ids and labels: `validate`, `preview`, `finetune` and `eval`
all call it (it drives `templates.ChatTemplate`'s render/tokenize/mask primitives), so what `preview` shows is
exactly what the trainer sees. `train/collate.py` only lays the encoded samples out in rows and tensors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .data import Conversation, LoadedData
from .errors import DataError, LorachatError
from .recipe import LoadedRecipe
from .templates import ChatTemplate, Encoded

CHUNK = 2048  # conversations per batched tokenizer call: big enough for Rust threads, small for memory


@dataclass
class SplitStats:
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    truncated: int = 0
    lengths: list[int] = field(default_factory=list)
    tokens: int = 0
    trained: int = 0
    roles: dict[str, list[int]] = field(default_factory=dict)  # role -> [tokens, trained]

    def percentiles(self, qs: tuple[int, ...] = (50, 90, 99, 100)) -> dict[int, int]:
        ordered = sorted(self.lengths)
        if not ordered:
            return {q: 0 for q in qs}
        return {q: ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] for q in qs}


@dataclass
class Prepared:
    train: list[Encoded]
    eval: list[Encoded]
    stats: dict[str, SplitStats]


def encode_split(conversations: list[Conversation], template: ChatTemplate, loaded: LoadedRecipe,
                 role_stats: bool = False, problems: list[DataError] | None = None) -> tuple[list[Encoded], SplitStats]:
    """Encode one split, applying `too_long`; problems are appended to `problems` (or raised when None)."""
    data = loaded.recipe.data
    stats = SplitStats(rows=len(conversations))
    kept: list[Encoded] = []
    chunks = [conversations[i:i + CHUNK] for i in range(0, len(conversations), CHUNK)]
    for encoded in _pipelined(chunks, template, data.train_on, role_stats):
        for item in encoded:
            if isinstance(item, DataError):
                if problems is None:
                    raise item
                problems.append(item)
                stats.dropped["refused by the template"] += 1
                continue
            item = _fit(item, data.max_length, data.too_long, stats, problems)
            if item is None:
                continue
            kept.append(item)
            stats.lengths.append(len(item.input_ids))
            stats.tokens += len(item.input_ids)
            stats.trained += item.trained
            for role, (n, t) in (item.roles or {}).items():
                acc = stats.roles.setdefault(role, [0, 0])
                acc[0] += n
                acc[1] += t
    stats.kept = len(kept)
    return kept, stats


def _pipelined(chunks: list[list[Conversation]], template: ChatTemplate, train_on: str,
               role_stats: bool) -> Iterator[list[Encoded | DataError]]:
    """Encode chunk by chunk, rendering the next chunk (Python, jinja) in a thread while this one is
    tokenized (Rust, which releases the GIL): the two halves of the work overlap on two cores."""
    if len(chunks) < 2:
        yield from (template.encode_batch(c, train_on, role_stats) for c in chunks)
        return
    with ThreadPoolExecutor(max_workers=1) as renderer:
        pending = renderer.submit(template.render_batch, chunks[0], train_on)
        for i, chunk in enumerate(chunks):
            rendered = pending.result()
            if i + 1 < len(chunks):
                pending = renderer.submit(template.render_batch, chunks[i + 1], train_on)
            yield template.tokenize_rendered(chunk, rendered, role_stats)


def _fit(item: Encoded, max_length: int, policy: str, stats: SplitStats,
         problems: list[DataError] | None) -> Encoded | None:
    if item.trained == 0:
        stats.dropped["no trained tokens"] += 1
        return None
    if len(item.input_ids) <= max_length:
        return item
    if policy == "error":
        err = DataError(f"sample has {len(item.input_ids)} tokens, over data.max_length={max_length} "
                        f"(too_long: error)", item.origin)
        if problems is None:
            raise err
        problems.append(err)
        stats.dropped["over max_length (too_long: error)"] += 1
        return None
    if policy == "drop":
        stats.dropped[f"over max_length={max_length}"] += 1
        return None
    cut = item.truncated(max_length)
    if cut.trained == 0:
        stats.dropped["truncation left no trained tokens"] += 1
        return None
    stats.truncated += 1
    return cut


def prepare(loaded: LoadedRecipe, data: LoadedData, template: ChatTemplate, role_stats: bool = False,
            problems: list[DataError] | None = None) -> Prepared:
    """Encode train and eval; refuse when nothing is left to train on, saying why."""
    train, train_stats = encode_split(data.train, template, loaded, role_stats, problems)
    evals, eval_stats = encode_split(data.eval, template, loaded, role_stats, problems)
    if not train and not (problems):
        reasons = "; ".join(f"{n} {why}" for why, n in train_stats.dropped.most_common()) or "no rows"
        raise LorachatError(f"every training row was dropped: {reasons}", loaded.where("data", "train"))
    return Prepared(train, evals, {"train": train_stats, "eval": eval_stats})
