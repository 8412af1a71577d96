"""Assistant-token loss per sample, under the very masks training used (`ChatTemplate.encode`)."""

from __future__ import annotations

from typing import Any

import torch

from ..templates import IGNORE, Encoded


@torch.inference_mode()
def sample_losses(model: Any, samples: list[Encoded], pad_id: int, batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL over trained tokens, trained token count) per sample, in input order.

    Sums, not means, so the caller can weight by tokens as training's eval loss does and still
    resample whole samples for a confidence interval.
    """
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch, so little of each forward is padding.
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    results: dict[int, tuple[float, int]] = {}
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start:start + batch_size]]
        width = max(len(s.input_ids) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T), right padded
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        for row, s in enumerate(chunk):
            n = len(s.input_ids)
            ids[row, :n] = torch.tensor(s.input_ids)
            labels[row, :n] = torch.tensor(s.labels)
            mask[row, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        # Token t is predicted from position t-1: the shift training's loss applies.
        target = labels[:, 1:].to(device)  # (B, T-1)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE, reduction="none")  # (B, T-1)
        counted = (target != IGNORE).sum(dim=1)  # (B,)
        for row, i in enumerate(order[start:start + batch_size]):
            results[i] = (float(nll[row].sum()), int(counted[row]))
    return [results[i] for i in range(len(samples))]
