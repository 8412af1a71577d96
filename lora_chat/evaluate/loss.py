"""Assistant-token loss per sample, under the very masks and batching training used."""

from __future__ import annotations

from typing import Any

import torch

from ..templates import IGNORE, Encoded
from ..train.collate import Collator, to_rows


@torch.inference_mode()
def sample_losses(model: Any, samples: list[Encoded], pad_id: int, batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL over trained tokens, trained token count) per sample, in input order.

    Sums, not means, so the caller can weight by tokens as training's eval loss does and still
    resample whole samples for a confidence interval. Rows are training's own unpacked rows and
    collator (per-sample shifted targets, right padding that causal attention never sees).
    """
    device = next(model.parameters()).device
    collate = Collator(pad_id=pad_id)
    # Longest first: similar lengths share a batch, so little of each forward is padding.
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    results: dict[int, tuple[float, int]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate(to_rows([samples[i] for i in rows], packing=False, max_length=0))
        logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                       use_cache=False).logits.float()  # (B, T, V)
        target = batch["shift_labels"].to(device)  # (B, T): what each position must predict
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE,
                                                reduction="none")  # (B, T)
        counted = (target != IGNORE).sum(dim=1)  # (B,)
        for row, i in enumerate(rows):
            results[i] = (float(nll[row].sum()), int(counted[row]))
    return [results[i] for i in range(len(samples))]
