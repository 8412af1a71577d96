"""The order rows are trained in: shuffled each epoch, and sorted by length within each optimizer step.

An optimizer step sums the loss over all its rows and divides by their trained-token count
(`LorachatTrainer.compute_loss`), so which of the step's micro-batches a row lands in does not change the update,
only the padding: sorted, rows of like length share a micro-batch. On bench_train's 64 FAQ rows (65-133 tokens)
real tokens go from 86% to 92% of the padded ones; on data with more spread in length the gain is larger. The
longest micro-batch comes first in each step, so a run that will not fit in memory fails at its first step.

Unlike transformers' `batch_rebalance` sampler, every row is trained every epoch (it drops an incomplete last
step) and every micro-batch has `batch_size` rows, which is what `lorachat plan` sizes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class StepSortedSampler(Sampler[int]):
    """Row indices: a seeded shuffle per epoch, then each run of `rows_per_step` sorted longest first.

    `rows_per_step` is batch_size x grad_accum x processes: every process draws the same order (same seed) and
    accelerate hands each one its own micro-batches of every step.
    """

    def __init__(self, lengths: Sequence[int], rows_per_step: int, seed: int):
        self.lengths, self.rows_per_step, self.seed = list(lengths), rows_per_step, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer at each epoch, resumed runs included
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for start in range(0, len(order), self.rows_per_step):
            yield from sorted(order[start:start + self.rows_per_step], key=lambda i: -self.lengths[i])
