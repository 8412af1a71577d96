"""Loss at trained positions only, projected onto the vocabulary a chunk of rows at a time.

The LM head is a large matmul (SmolLM2-135M: vocab 49152 x 576, ~21% of the model's matmul work) and in chat
SFT roughly 40% of tokens are prompt, so projecting only trained positions saves real time and memory. A forward
pre-hook on the head does the selection, so the call still goes through the (DDP-wrapped) model's own forward and
gradient sync works unchanged.

For a plain `nn.Linear` head (every causal LM lorachat trains; PEFT leaves it alone under all-linear) the hook
also takes the selected hidden states for itself and lets the head project nothing: `chunked_cross_entropy` then
projects a chunk of rows at a time (plan.memory.loss_chunk_rows: at most 8M logits, 128 rows at SmolLM2's
vocabulary, 64 at Llama 3's 128k) and computes the hidden states' gradient in the same pass, as Liger's
fused linear cross-entropy does. The (K, V) fp32 logits, their log-softmax and its gradient (K x 49152 x 12 bytes,
~200 MB for one packed 512-token row; 6 GB for Llama 3 at 2 x 2048) never exist at once, and backward is one
matmul per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..plan.memory import loss_chunk_rows
from ..templates import IGNORE



class TrainedPositions:
    """Makes `lm_head` see only the positions selected by `only(mask)`; a no-op outside it."""

    def __init__(self, lm_head: torch.nn.Module):
        self._mask: torch.Tensor | None = None
        self.head = lm_head
        # A head with its own adapter (modules_to_save, LoRA on lm_head) or a bias goes through its own forward.
        self.fused = type(lm_head) is torch.nn.Linear and lm_head.bias is None
        self.hidden: torch.Tensor | None = None  # (K, H) when fused: what the head would have projected
        lm_head.register_forward_pre_hook(self._select)

    def _select(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if self._mask is None:
            return None
        hidden = args[0][self._mask]  # (K, H)
        if not self.fused:
            return (hidden,) + args[1:]
        self.hidden = hidden
        return (hidden[:0],) + args[1:]  # (0, H): the head projects nothing; the loss does it chunk by chunk

    @contextmanager
    def only(self, mask: torch.Tensor) -> Iterator[None]:
        self._mask = mask
        try:
            yield
        finally:
            self._mask = None


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets), with the gradients computed chunk by chunk in
    forward and kept (hidden's: K x H; weight's only if it trains) instead of the logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None  # (K, H)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V, H)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]  # (C, H), (C,)
            loss, grad = _chunk_loss(h, weight, t, need_h or need_w)
            total += loss
            if need_h:
                grad_h[start:start + chunk] = grad @ weight
            if need_w:
                grad_w += grad.t().float() @ h.float()
            del grad  # before the next chunk allocates its own (see _chunk_loss)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_total.float()
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype),
                None, None)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, need_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's summed loss and, if wanted, d(loss)/d(logits) in the weight's dtype.

    A function of its own so that its fp32 (C, V) buffer dies on return: when the loop kept it in a local, the
    previous chunk's buffer and gradient lived on while the next chunk allocated its own, and the loss's peak was
    1.5x the one chunk (fp32 buffer + one copy in the weight's dtype) that plan counts."""
    # fp32 softmax: in bf16 the log-sum-exp over a 50k vocab loses the small differences training follows.
    logits = F.linear(h, weight).float()  # (C, V)
    target = logits.gather(1, t[:, None]).squeeze(1)  # (C,)
    peak = logits.amax(dim=-1, keepdim=True)  # (C, 1)
    exp = logits.sub_(peak).exp_()  # in place: one (C, V) buffer for logits, exp and the gradient
    sums = exp.sum(dim=-1, keepdim=True)  # (C, 1)
    loss = (peak.squeeze(1) + sums.squeeze(1).log() - target).sum()  # log-sum-exp - target logit
    if not need_grad:
        return loss, None
    grad = exp.div_(sums)  # softmax
    grad[torch.arange(len(t), device=t.device), t] -= 1  # d(sum of losses)/d(logits)
    return loss, grad.to(weight.dtype)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, never holding all (K, V) logits.

    `chunk` rows at a time; by default as many as plan/memory.py counts for this vocabulary."""
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk or loss_chunk_rows(weight.shape[0]))


def token_loss_sum(model: torch.nn.Module, selector: TrainedPositions, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over trained positions, and how many there were."""
    targets = batch["shift_labels"]  # (B, T)
    mask = targets != IGNORE  # (B, T)
    with selector.only(mask):
        # use_cache=False matters: with a KV cache transformers skips the packed-sequence mask (masking_utils).
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    if selector.fused:
        hidden, selector.hidden = selector.hidden, None
        loss = chunked_cross_entropy(hidden, selector.head.weight, targets[mask])
    else:
        loss = F.cross_entropy(logits.float(), targets[mask], reduction="sum")  # logits: (K, V)
    return loss, int(mask.sum())
