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
The runtime (runtime/adapter_set.py, runtime/generate.py) uses PEFT's path as it is, for inference.

Here every adapter of the joint run is active and trainable (so PEFT's own forward would add all of them to every
row), and each LoRA layer's forward is replaced, per instance, by `mixed_forward`: the frozen base layer once over
the whole micro-batch, then for each adapter its rows through its own dropout, A and B, added out of place with
`index_add` (without dropout, A runs over every row and its narrow output is what gets split: no copy of x). Autograd then sends a row's gradient only into the A and B that saw it, and the base
(frozen) is shared. The row groups are set once per micro-batch (`route`), as index tensors, for every layer.
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
        if isinstance(dropout, torch.nn.Identity) and layer._cast_input_dtype(x, lora_A.weight.dtype) is x:
            # Every row through A, then this adapter's rows of the (B, T, r) result: autograd saves x itself,
            # which the base layer holds already, where x[rows] would save a copy of every LoRA layer's input
            # (measured: 1.5x the activations of one adapter's run). A is r wide, so the unused rows cost little.
            projected = lora_A(x).index_select(0, rows)  # (b, T, r), b = this adapter's rows
        else:
            sub = layer._cast_input_dtype(x.index_select(0, rows), lora_A.weight.dtype)
            projected = lora_A(dropout(sub))
        delta = lora_B(projected) * layer.scaling[name]  # (b, T, out)
        result = _AddRows.apply(result, rows, delta.to(result.dtype))
    return result


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
