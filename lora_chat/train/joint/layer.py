"""LoRA layers that train several adapters in one batch: each row's delta from its own adapter, and its gradient
reaching only that adapter.

PEFT mixes adapters in a batch for inference only (`LoraModel._check_forward_args` refuses `adapter_names` in
training mode), and for good reason, in three places of peft 0.21:
  - which adapters train is `set_adapter`'s list of *active* adapters: their weights get requires_grad, all others
    are frozen, and in a normal forward every active adapter is added to every row. `adapter_names` routes rows to
    adapters with no regard to that list, so an adapter that is routed to but not active gets no gradient, and one
    that is active but not routed to still gets added by nothing and trained by nothing;
  - `_mixed_batch_forward` adds each sub-batch's delta into the base output in place
    (`result[rows] += delta`), which a later in-place op or a reused buffer can invalidate for backward;
  - the row lists are rebuilt in Python in every layer of every forward from a list of strings.
The runtime's inference batches replace PEFT's loop too (runtime/gathered_lora.py), but hold no gradients.

Here every adapter of the joint run is active and trainable (so PEFT's own forward would add all of them to every
row), and each LoRA layer's forward is replaced, per instance, by `mixed_forward`: the frozen base layer once over
the whole micro-batch, then for each adapter its rows through its own dropout, A and B, added out of place with
`index_add`; neither the rows' inputs nor their deltas are copied for backward (`_RowsThrough`, `_AddRows`).
Autograd then sends a row's gradient only into the A and B that saw it, and the base (frozen) is shared. The row groups are set once per micro-batch (`route`), as index tensors, for every layer.
Adapters may differ in rank, alpha, targets (a layer an adapter does not target has no entry for it) and rsLoRA;
DoRA and other PEFT variants, whose forward is not `B(A(x))`, are refused by the compatibility check.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

# (adapter name, row indices) pairs of the micro-batch being trained: set by `route` for forward and backward (a
# checkpointed layer runs its forward again during backward).
_routes: contextvars.ContextVar[tuple[tuple[str, torch.Tensor], ...] | None] = contextvars.ContextVar(
    "lorachat_joint_routes", default=None)


@contextlib.contextmanager
def route(adapter_of_row: Sequence[str], device: torch.device | str = "cpu") -> Iterator[None]:
    """Inside this block row b of every forward belongs to adapter `adapter_of_row[b]`."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_of_row):
        groups.setdefault(name, []).append(row)
    token = _routes.set(tuple((name, torch.tensor(rows, device=device)) for name, rows in groups.items()))
    try:
        yield
    finally:
        _routes.reset(token)


def mixed_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A PEFT `lora.Linear`'s output with each row's delta from the adapter `route` gave it: (B, T, in) -> (B, T, out)."""
    result = layer.base_layer(x, *args, **kwargs)  # (B, T, out): the frozen base, once for all rows
    routes = _routes.get()
    if routes is None:
        raise RuntimeError("a joint-training LoRA layer ran outside `route(...)`: no row knows its adapter")
    for name, rows in routes:
        if name not in layer.lora_A:  # this adapter does not target this layer
            continue
        lora_A, lora_B, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        # PEFT's input cast (train/lora_compute.py turns it off on a bf16 base) is a copy when it changes x
        if isinstance(dropout, torch.nn.Identity) and lora_A.bias is None \
                and layer._cast_input_dtype(x, lora_A.weight.dtype) is x:
            projected = _RowsThrough.apply(x, rows, lora_A.weight.to(x.dtype))  # (b, T, r)
        else:
            sub = layer._cast_input_dtype(x.index_select(0, rows), lora_A.weight.dtype)  # (b, T, in)
            projected = lora_A(dropout(sub))
        delta = lora_B(projected) * layer.scaling[name]  # (b, T, out)
        result = _AddRows.apply(result, rows, delta.to(result.dtype))
    return result


class _RowsThrough(torch.autograd.Function):
    """`x[rows] @ weight.T`, keeping x itself and the indices for backward. Autograd would keep the (b, T, in) copy
    x[rows] for the weight's gradient: a copy of every LoRA layer's input per adapter, where x is kept already by
    the base layer (measured with torch's ops: a mixed micro-batch saved 1.5x one adapter's activations). Backward
    selects the rows again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, rows, weight)
        return F.linear(x.index_select(0, rows), weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        x, rows, weight = ctx.saved_tensors  # grad: (b, T, r)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x).index_add_(0, rows, grad @ weight)  # (B, T, in), zero off this adapter's rows
        if ctx.needs_input_grad[2]:
            grad_w = grad.flatten(0, -2).T @ x.index_select(0, rows).flatten(0, -2)  # (r, in)
        return grad_x, None, grad_w


class _AddRows(torch.autograd.Function):
    """`result.index_add(0, rows, delta)`, out of place, saving only `rows`: torch's own index_add keeps `delta`
    (b, T, out) for its backward, which needs only its shape; over every adapted layer that is one more copy of
    every layer's output (measured: a quarter of the joint run's saved activations)."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return result.index_add(0, rows, delta)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        (rows,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, rows)


def use_mixed_forward(model: Any, names: Sequence[str]) -> None:
    """Make every adapter in `names` active and trainable, and every LoRA layer of `model` route rows by adapter."""
    from peft.tuners.lora.layer import LoraLayer

    model.base_model.set_adapter(list(names))  # requires_grad on every adapter's A and B
    for module in model.modules():
        # Linear, and bitsandbytes' Linear4bit / Linear8bitLt (QLoRA), share the base_layer + lora_A/B layout;
        # LoRA on embeddings or convolutions has another forward (the compatibility check refuses those targets).
        if isinstance(module, LoraLayer) and "forward" not in vars(module):
            if module.lora_embedding_A or not isinstance(module.get_base_layer(), torch.nn.Linear):
                raise ValueError(f"joint training routes rows through linear LoRA layers only, not {type(module).__name__}")
            module.forward = functools.partial(mixed_forward, module)
