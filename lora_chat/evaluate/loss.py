"""Assistant-token loss per sample, under the very masks and batching training used, on the runtime.

Logits are computed only where a token is trained, a chunk at a time: the model runs with
`logits_to_keep=1` (its own head sees one position per row), the decoder's final hidden states are
caught on their way out, and the head is applied to the trained positions alone, `HEAD_CHUNK` rows
of (V,) float32 at a time. The full (B, T, V) float32 tensor (gigabytes with a 128k vocabulary) is
never built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..templates import IGNORE, Encoded
from ..train.collate import Collator, to_rows

if TYPE_CHECKING:
    from ..runtime import AdapterSet

HEAD_CHUNK = 1024  # trained positions per head matmul: (1024, V) fp32 is 200 MB at V = 49k, 0.5 GB at 128k


@torch.inference_mode()
def sample_losses(rt: AdapterSet, names: list[str], samples: list[Encoded],
                  batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL over trained tokens, trained token count) per sample, in input order.

    Row i runs through resident `names[i]` (the base or an adapter); rows of different adapters share
    a batch. Sums, not means, so the caller can weight by tokens as training's eval loss does and
    still resample whole samples for a confidence interval. Rows are training's own unpacked rows
    and collator (per-sample shifted targets, right padding that causal attention never sees).
    """
    model = rt.model
    device = next(model.parameters()).device
    collate = Collator(pad_id=rt.tokenizer.pad_token_id)
    head = model.get_output_embeddings()
    caught: list[torch.Tensor] = []
    hook = model.get_decoder().register_forward_hook(lambda _m, _i, out: caught.append(out[0]))
    # Longest first: similar lengths share a batch, so little of each forward is padding.
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    results: dict[int, tuple[float, int]] = {}
    try:
        with rt.lock:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = collate(to_rows([samples[i] for i in rows], packing=False, max_length=0))
                routing = {"adapter_names": rt.peft_names([names[i] for i in rows])} \
                    if hasattr(model, "peft_config") else {}
                caught.clear()
                model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                      use_cache=False, logits_to_keep=1, **routing)
                hidden = caught[-1]  # (B, T, H): the decoder's output, final norm applied
                target = batch["shift_labels"].to(device)  # (B, T): what each position must predict
                trained = (target != IGNORE).nonzero()  # (N, 2): (row, position) of every trained token
                nll = torch.zeros(len(rows), dtype=torch.float64)  # (B,)
                for lo in range(0, len(trained), HEAD_CHUNK):
                    at = trained[lo:lo + HEAD_CHUNK]
                    logits = _final(head(hidden[at[:, 0], at[:, 1]]).float(), model.config)  # (n, V)
                    losses = torch.nn.functional.cross_entropy(logits, target[at[:, 0], at[:, 1]], reduction="none")
                    nll.index_add_(0, at[:, 0].cpu(), losses.double().cpu())
                counted = (target != IGNORE).sum(dim=1)  # (B,)
                for row, i in enumerate(rows):
                    results[i] = (float(nll[row]), int(counted[row]))
    finally:
        hook.remove()
    return [results[i] for i in range(len(samples))]


def _final(logits: torch.Tensor, config: object) -> torch.Tensor:
    """What a causal LM's forward does to its head's output (Cohere scales, Gemma-2 soft-caps)."""
    scale = getattr(config, "logit_scale", None)
    if scale:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
