"""Kernels whose result for a row does not depend on the other rows of the batch (docs/batch-invariance.md).

Two things make a greedy reply change with its batch on CPU, both measured on SmolLM2-135M:
  1. matmul shapes. MKL's float32 GEMM gives a row different bits for different row counts M
     (M = 1 takes a GEMV path; M = 2..300 change the blocking), and the row count of every linear
     layer is batch x tokens. Fix: while the runtime decodes, every `nn.Linear` runs on tiles
     of exactly `DECODE_TILE` (one token per row) or `PREFILL_TILE` rows (prompts), the last tile
     zero-padded. With M fixed, a row gets the same bits at any position in the tile, next to any
     other rows (checked for every SmolLM2 shape), so alone and batched agree. oneDNN's bf16 GEMM
     did not vary with M here, but tiling costs it nothing and covers kernels we did not check.
  2. attention over left padding. The stock SDPA kernel reduces a row's softmax and value sums over
     the padded length, with the row's keys shifted by its padding. Fix: each row attends over
     exactly its own keys, sliced out of the batch, with the same call a batch of one makes.
Positions come from the attention mask (each row counts from its first real token) and the KV cache
holds each row's keys at the positions a lone row would have, so neither needs a change.

Cost: decode steps always pay for `DECODE_TILE` rows (a lone request computes 8 rows, which on a
memory-bound CPU step costs little), prompts are padded to a multiple of `PREFILL_TILE` rows, and
attention runs one SDPA call per row per layer. Outside the runtime's decode loop (eval's loss,
training) the stock kernels run unchanged. bitsandbytes' 4-bit and 8-bit layers are tiled the same way.
"""

from __future__ import annotations

import contextlib
import functools
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch

NAME = "lorachat_invariant"
DECODE_TILE = 8  # rows per linear call while decoding (one token per row): the most rows a lone step pays for
PREFILL_TILE = 32  # rows per linear call over prompts (and the head over each row's last position): fewer calls, little padding
_tile: contextvars.ContextVar[int | None] = contextvars.ContextVar("lorachat_linear_tile", default=None)


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
        # The row's own keys, shared by each group of query heads inside the kernel (enable_gqa): repeating
        # them per head first copied every row's cache each step (27% of a row's attention call on SmolLM2, measured).
        k = key[b:b + 1, :, kv_len - n:].contiguous()  # (1, Hkv, n, D)
        v = value[b:b + 1, :, kv_len - n:].contiguous()
        if nq == 1 or nq == n:
            mask, causal = None, nq > 1
        else:  # queries over a cached prefix: causal, aligned to the end
            mask = torch.ones(nq, n, dtype=torch.bool, device=q.device).tril(n - nq)
            causal = False
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                             scale=scaling, enable_gqa=groups > 1)  # (1, H, nq, D)
        out[b, q_len - nq:] = o[0].transpose(0, 1)
    return out, None


def tiled_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, on fixed tiles of rows while `tiles(...)` is active, else the stock call."""
    return tiled(functools.partial(_linear, module), x)


def tiled(rowwise: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`rowwise(x)` for a function of rows (a matmul: (M, K) -> (M, N)), on fixed tiles of rows while `tiles(...)`
    is active, else called once on `x` as it is."""
    tile = _tile.get()
    if tile is None:
        return rowwise(x)
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    rows = flat.shape[0]
    pad = -rows % tile
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])])  # (M + pad, K)
    out = torch.cat([rowwise(t) for t in flat.split(tile)])
    return out[:rows].reshape(*x.shape[:-1], out.shape[-1])  # (..., N)


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # bitsandbytes' 4-bit and 8-bit layers subclass nn.Linear with forwards of their own (dequantize, then
    # multiply); a fixed row count per call pins their kernels' shapes just as it does a plain GEMM's.
    if type(module) is torch.nn.Linear:
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return type(module).forward(module, x)


@contextlib.contextmanager
def tiles(prefill: bool) -> Iterator[None]:
    """Linear layers run on fixed tiles inside this block (the decode loop wraps each forward in it)."""
    token = _tile.set(PREFILL_TILE if prefill else DECODE_TILE)
    try:
        yield
    finally:
        _tile.reset(token)


def use_invariant_kernels(model: Any) -> None:
    """Switch `model` to the invariant attention and give every `nn.Linear` (4-bit and 8-bit ones too) the tiled
    forward.

    Idempotent: call it again after attaching an adapter, so its LoRA matrices are tiled too.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, invariant_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and "forward" not in vars(module):
            module.forward = functools.partial(tiled_linear, module)
