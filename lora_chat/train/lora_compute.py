"""LoRA's matmuls in the base's compute dtype, with fp32 master weights: mixed precision for the adapter alone.

PEFT keeps LoRA weights in fp32 (autocast_adapter_dtype) so that small updates are not rounded away, and to match
them it casts each LoRA layer's *input* to fp32 (`_cast_input_dtype`). On a bf16 base that input cast is a new fp32
copy of the activation per adapted module, and autograd keeps it for A's weight gradient: for Llama 3.1 8B at
2 x 2048 tokens, ~140 KB a token in the layer being recomputed, ~0.5 GiB, plus fp32 gradients flowing back
through the layer. Casting the *weights* to the input's dtype instead (what torch.autocast does for every linear,
and what Unsloth's LoRA kernels do) keeps what autograd saves in bf16, and it is the same tensor the frozen base
layer received, so nothing is copied. The master weights, their gradients and the optimizer stay fp32: the cast's
backward hands A and B their gradients in fp32.

No library does this for PEFT's layers: `peft.helpers.disable_input_dtype_casting` only turns the input cast off
(meant for running under autocast, which would also cast the frozen base and every other op), so the adapter's
A and B become `CastLinear`s holding the very same Parameters (state-dict keys unchanged: saving, resume and
FSDP see PEFT's own layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CastLinear(nn.Linear):
    """An `nn.Linear` whose weight is cast to its input's dtype for the matmul; the Parameter keeps its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def _as_cast_linear(linear: nn.Linear) -> CastLinear:
    cast = CastLinear.__new__(CastLinear)
    nn.Module.__init__(cast)
    cast.in_features, cast.out_features = linear.in_features, linear.out_features
    cast.weight, cast.bias = linear.weight, linear.bias  # the same Parameters, not copies
    cast.train(linear.training)
    return cast


def compute_lora_in_base_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Make every plain LoRA layer of `model` run its matmuls in `dtype`; returns how many layers changed.

    Nothing changes when the base computes in fp32 (there is no copy to save) or for DoRA, whose magnitude
    normalisation PEFT computes in the adapter's dtype through its own variant forward."""
    if dtype == torch.float32:
        return 0
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in list(module.lora_A.keys()):
            if name in getattr(module, "lora_variant", {}) or not isinstance(module.lora_A[name], nn.Linear):
                continue
            module.lora_A[name] = _as_cast_linear(module.lora_A[name])
            module.lora_B[name] = _as_cast_linear(module.lora_B[name])
            changed += 1
        module.cast_input_dtype_enabled = False
    return changed
