"""Attention whose result for a row does not depend on the other rows of the batch.

Why (measured on SmolLM2-135M, docs/batch-invariance.md): with left-padded batches the stock SDPA
kernel reduces each row's softmax and value sums over the padded length, with the row's real keys
shifted by its padding, so the float summation order (and the kernel blocking) changes with the
longest prompt in the batch; in bf16 a near-tie between two tokens then flips and the greedy reply
diverges. The linear layers are not the problem in bf16 on CPU (oneDNN's bf16 GEMM gives a row the
same bits whatever the number of rows), and positions are computed from the attention mask.

The fix: each row attends over exactly its own keys, sliced out of the batch, with the same call a
batch of one makes. A row's attention then sees the same shapes and the same values alone or
batched, so its result is bitwise the same. Cost: one SDPA call per row per layer instead of one per
layer (a Python loop of B small calls; the matmuls around it stay batched).
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "lorachat_invariant"


ROW_LENGTHS = "invariant_row_lengths"  # the forward kwarg that turns it on: real keys per left-padded row


def invariant_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (B, H, q, D), key/value (B, Hkv, k, D) -> (B, q, H, D).

    Per row when the forward passes `invariant_row_lengths` (B ints: how many of the last key
    columns are the row's real tokens; rows are left-padded, as the runtime's decode loop builds
    them). Every other forward (eval's loss over right-padded rows, packed rows) is the stock SDPA
    one, with its masks, unchanged.
    """
    lengths = kwargs.pop(ROW_LENGTHS, None)
    if lengths is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    groups = heads // key.shape[1]
    out = query.new_zeros(batch, q_len, heads, query.shape[-1])  # (B, q, H, D); padded queries stay 0
    for b, n in enumerate(lengths):
        nq = min(q_len, n)
        q = query[b:b + 1, :, q_len - nq:].contiguous()  # (1, H, nq, D)
        k = key[b:b + 1, :, kv_len - n:]  # (1, Hkv, n, D)
        v = value[b:b + 1, :, kv_len - n:]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        k, v = k.contiguous(), v.contiguous()
        if nq == 1 or nq == n:
            mask, causal = None, nq > 1
        else:  # queries over a cached prefix: causal, aligned to the end
            mask = torch.ones(nq, n, dtype=torch.bool, device=q.device).tril(n - nq)
            causal = False
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                             scale=scaling)  # (1, H, nq, D)
        out[b, q_len - nq:] = o[0].transpose(0, 1)
    return out, None


def use_invariant_attention(model: Any) -> None:
    """Register the invariant attention with transformers (masks as for sdpa) and switch `model` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, invariant_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
