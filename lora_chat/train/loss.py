"""Loss at trained positions only: the LM head runs on the hidden states whose target is not IGNORE.

The LM head is a large matmul (SmolLM2-135M: vocab 49152 x 576, ~21% of the model's matmul work) and in chat
SFT roughly 40% of tokens are prompt, so projecting only trained positions saves real time and the (B, T, V)
logits tensor. A forward pre-hook on the head does the selection, so the call still goes through the
(DDP-wrapped) model's own forward and gradient sync works unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..templates import IGNORE


class TrainedPositions:
    """Makes `lm_head` see only the positions selected by `only(mask)`; a no-op outside it."""

    def __init__(self, lm_head: torch.nn.Module):
        self._mask: torch.Tensor | None = None
        lm_head.register_forward_pre_hook(self._select)

    def _select(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if self._mask is None:
            return None
        hidden = args[0]  # (B, T, H)
        return (hidden[self._mask],) + args[1:]  # (K, H)

    @contextmanager
    def only(self, mask: torch.Tensor) -> Iterator[None]:
        self._mask = mask
        try:
            yield
        finally:
            self._mask = None


def token_loss_sum(model: torch.nn.Module, selector: TrainedPositions, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over trained positions, and how many there were."""
    targets = batch["shift_labels"]  # (B, T)
    mask = targets != IGNORE  # (B, T)
    with selector.only(mask):
        # use_cache=False matters: with a KV cache transformers skips the packed-sequence mask (masking_utils).
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    # fp32 softmax: in bf16 the log-sum-exp over a 50k vocab loses the small differences training follows.
    loss = F.cross_entropy(logits.float(), targets[mask], reduction="sum")
    return loss, int(mask.sum())  # logits: (K, V), K = trained positions
