"""Training rows from encoded samples: one sample per row, or several packed, and the collator that pads them.

Labels from `encoding.prepare` are unshifted (label[t] is token t when trained). Here each sample is shifted
on its own, so target[t] is what position t must predict; the last token of a packed sample never predicts the
first of the next. Packed samples restart their position ids at 0, which is what keeps attention inside each
sample: flash-attention turns the restarts into `cu_seqlens` (padding-free), and on SDPA/eager transformers
builds a block-diagonal causal mask from them when no attention_mask and no KV cache is given
(`find_packed_sequence_indices`; tests/test_train.py checks per-sample losses packed vs unpacked).
Right padding needs no attention mask either: under a causal mask no real token ever sees a later pad, so
pads simply continue the last sample's positions.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch

from ..templates import IGNORE, Encoded


class Row(TypedDict):
    """One training row: a dict, because that is what a `datasets.Dataset` (which SFTTrainer takes) hands back."""

    input_ids: list[int]  # (T,)
    targets: list[int]  # (T,) shifted per sample; IGNORE where no loss
    position_ids: list[int]  # (T,) restart at 0 at each packed sample


def _targets(sample: Encoded) -> list[int]:
    return sample.labels[1:] + [IGNORE]


def to_rows(samples: Sequence[Encoded], packing: bool, max_length: int) -> list[Row]:
    """One row per sample, or samples packed best-fit-decreasing into rows of at most `max_length` tokens."""
    if not packing:
        return [Row(input_ids=s.input_ids, targets=_targets(s), position_ids=list(range(len(s.input_ids))))
                for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index): best fit = the tightest room that fits
    for i in order:
        size = len(samples[i].input_ids)
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - size, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - size, len(bins) - 1))
    rows = []
    for members in bins:
        members.sort()  # data order inside a row, so packing is reproducible and readable
        ids, targets, positions = [], [], []
        for i in members:
            ids += samples[i].input_ids
            targets += _targets(samples[i])
            positions += range(len(samples[i].input_ids))
        rows.append(Row(input_ids=ids, targets=targets, position_ids=positions))
    return rows


def as_dataset(rows: list[Row]):
    """Rows as the `datasets.Dataset` SFTTrainer requires (it refuses a plain torch Dataset)."""
    from datasets import Dataset

    return Dataset.from_dict({key: [row[key] for row in rows] for key in Row.__annotations__})


@dataclass
class Collator:
    """Rows -> tensors. `flatten` concatenates the batch into one unpadded row (padding-free, flash-attention)."""

    pad_id: int
    flatten: bool = False
    multiple_of: int = 8  # round padded lengths so matmul shapes repeat (allocator reuse, kernel choice)

    def __call__(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        if self.flatten:
            rows = [Row(**{key: sum((r[key] for r in rows), []) for key in Row.__annotations__})]
        longest = max(len(r["input_ids"]) for r in rows)
        if not self.flatten:
            longest = -(-longest // self.multiple_of) * self.multiple_of
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)  # (B, T)
        targets = torch.full((len(rows), longest), IGNORE, dtype=torch.long)  # (B, T)
        positions = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[b, :n] = torch.tensor(row["input_ids"])
            targets[b, :n] = torch.tensor(row["targets"])
            positions[b, :n] = torch.tensor(row["position_ids"])
            # Pads continue the last sample's positions: a row of one sample then has no restart, and a batch of
            # such rows gets plain causal attention (SDPA's is_causal, no mask tensor; half the blocks skipped)
            # instead of a packed-sample mask. Causal attention never lets a real token see a later pad.
            after = row["position_ids"][-1] + 1 if n else 0
            positions[b, n:] = torch.arange(after, after + longest - n)
        return {"input_ids": ids, "position_ids": positions, "shift_labels": targets,
                "real_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows))}
