"""One preference micro-batch's gradient in two backward passes, so only one side's activations are held at a time.

A pair's loss couples its two sides: d loss / d chosen depends on the rejected side's log-probability and back.
Run as one forward over the 2B rows (TRL's layout), the graph of both sides lives until the backward, and a DPO
run holds twice the activations of an SFT run on the same rows. Here instead, with "first" the wider side of the
micro-batch and "second" the other:
  1. the second side's log-probabilities, without gradients (a forward of B rows);
  2. the first side with gradients, its loss against (1) held constant, backward: its activations are freed;
  3. the second side again, with gradients; the caller computes the loss against the first side's value held
     constant, and the trainer runs its backward as for any loss.
The sum of the two backwards is exactly the gradient of the coupled loss (each side's partial derivative, taken at
the other side's value), for one extra forward of B rows without gradients: about 1.17x the compute of the single
pass for half its activation memory. Step (3) replays the random-number stream of step (1), so LoRA dropout draws
the same masks and the value held constant in (2) is the value (3) computes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..templates import IGNORE

SIDE_KEYS = ("input_ids", "position_ids", "shift_labels")


def side(batch: dict, rows: slice) -> dict:
    """Those rows of a pair batch (chosen first, then rejected), cut after their last trained position: the
    collator pads both sides to the longer one, and with causal attention the columns after it change nothing."""
    labels = batch["shift_labels"][rows]  # (B, T)
    width = int((labels != IGNORE).any(dim=0).nonzero().max()) + 1
    return {key: batch[key][rows, :width] for key in SIDE_KEYS}


def two_passes(logps: Callable[[dict], torch.Tensor], loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               batch: dict, backward: Callable[[torch.Tensor], None],
               first_pass: Callable[[], AbstractContextManager[Any]],
               settle: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probabilities (B,), (B,); the wider side's gradient is already applied by
    `backward`, so that side is detached and the other carries its graph for the caller's loss and backward.

    `logps(side_batch)` scores one side; `loss(chosen, rejected)` is the scalar the trainer minimises;
    `first_pass()` wraps the first side's forward and backward (DDP's no_sync: gradients are reduced once, in
    the caller's backward); `settle()` runs after the pass without gradients (host_memory.release_freed on a
    CPU: its freed blocks, of other shapes than a gradient pass's, do not stay resident beside the next pass's
    tensors). Not after the first side's backward: the second side's pass reuses those blocks as they are, and
    handing them back costs a page fault for each page taken again."""
    pairs = batch["input_ids"].shape[0] // 2
    chosen_rows, rejected_rows = side(batch, slice(0, pairs)), side(batch, slice(pairs, None))
    # The wider side's gradient pass runs first, so the narrower side's pass after it fits in the blocks it freed;
    # the other way round, the wider pass's blocks do not fit the holes and a CPU's heap grows beside them (glibc
    # keeps freed blocks resident). Either order gives the same gradient.
    swap = rejected_rows["input_ids"].shape[1] > chosen_rows["input_ids"].shape[1]
    first, second = (rejected_rows, chosen_rows) if swap else (chosen_rows, rejected_rows)

    def in_order(first_side: torch.Tensor, second_side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (second_side, first_side) if swap else (first_side, second_side)  # (chosen, rejected)

    start = _rng_state()
    with torch.no_grad():
        second_value = logps(second)
    settle()
    with first_pass():
        first_logps = logps(first)
        backward(loss(*in_order(first_logps, second_value)))
    after = _rng_state()
    _set_rng_state(start)
    second_logps = logps(second)
    _set_rng_state(after)
    return in_order(first_logps.detach(), second_logps)


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
