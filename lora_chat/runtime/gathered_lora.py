"""Mixed-adapter batches in two LoRA matmuls per layer, however many adapters the batch names.

PEFT's mixed-batch forward (`LoraLayer._mixed_batch_forward`, read in PEFT 0.21.2) loops, in every LoRA layer,
over the adapters the batch names: it indexes each adapter's rows out of the input, runs that adapter's A and B
on them and scatters the result back. That is two matmuls, an index and an index_put per adapter per layer (and
each matmul is padded to a full tile by the invariant kernels): with three adapters in a batch SmolLM2's 210 LoRA
layers make 1260 small matmuls a step, not 420. On a CPU each call also starts the thread pool, and under load
(serve's HTTP threads, a second process) a call whose threads wait for a busy core costs far more than its FLOPs,
so a step's cost grew with the number of adapters in it. PEFT's path is also inference-only (it refuses
`adapter_names` in training), so nothing is lost by replacing it where the runtime serves.

Here each LoRA layer keeps its resident adapters' matrices concatenated along the rank, A_all (sum r, in) and
B_all (out, sum r), each adapter's columns of B times its `scaling` (which holds rsLoRA's alpha/sqrt(r) too).
A forward with `adapter_names` computes h = x A_all^T for every adapter at once, zeroes in each row the columns of
the adapters it does not name (a 0/1 mask per row; a base row keeps none, so its delta is exactly 0), and adds
(h * mask) B_all^T to the base output. Both matmuls run on the invariant kernels' fixed tiles (`invariant.tiled`),
like every other linear, and the mask is elementwise, so a row's bits still do not depend on its neighbours.

Why not gather each row's own A and B and run one batched matmul (bmm) over rows: on a CPU that copies every
row's matrices in every layer (at 8 rows of rank 16, about as many bytes as the base weights a step reads), a
prompt would need a copy per token, and a bmm over prompts of different lengths gives each row a matmul shape of
its own (batch-invariance is about fixed shapes). The price here: every row computes h for every resident
adapter, cheap next to the base matmul for a handful of adapters (three of rank 16 on a 576-wide layer: 8% of
its FLOPs) and growing with their number.

Covered: PEFT's `lora.Linear` and bitsandbytes' 4-bit and 8-bit LoRA layers (their LoRA part is the same; the
base layer is called as PEFT calls it), in eval mode, not merged, for adapters without a variant (DoRA is
refused at load, aLoRA and the like are not) and without `lora_bias`, all of one dtype. Dropout is not applied:
in eval mode it is the identity. A layer with anything else runs PEFT's own path, as does any forward without
`adapter_names`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .invariant import tiled

_STACK = "_lorachat_lora_stack"  # on each LoRA layer: (the adapter keys it was built for, its _Stack or None)


@dataclass(frozen=True)
class _Stack:
    layout: tuple[tuple[str, int], ...]  # (PEFT adapter key, rank) in column order
    a: torch.Tensor  # (sum r, in)
    b: torch.Tensor  # (out, sum r), each adapter's columns times its scaling


def install(model: Any) -> None:
    """Give every covered LoRA layer of `model` the gathered forward, and drop the stacks built so far.

    Call it after every adapter load and unload: a layer's stack is rebuilt on its next forward from the adapters
    it then holds (a layer also rebuilds on its own when its adapters change, so a stale stack is never used).
    """
    for layer in model.modules():
        if isinstance(layer, _covered_types()):
            layer.__dict__.pop(_STACK, None)
            if "forward" not in vars(layer):
                layer.forward = functools.partial(gathered_forward, layer)


def gathered_forward(layer: Any, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None,
                     **kwargs: Any) -> torch.Tensor:
    """The LoRA layer's forward; with `adapter_names` (one PEFT key or "__base__" per row of `x`, as PEFT's hook
    passes it) the gathered one, else PEFT's."""
    stack = _stack(layer) if adapter_names is not None and not kwargs and len(adapter_names) == len(x) else None
    if stack is None:
        return type(layer).forward(layer, x, *args, adapter_names=adapter_names, **kwargs)
    result = layer.base_layer(x, *args)
    mask = _mask(tuple(adapter_names), stack.layout, stack.a.dtype, stack.a.device)  # (B, R)
    if mask is None:
        return result
    h = tiled(functools.partial(torch.nn.functional.linear, weight=stack.a), x.to(stack.a.dtype))  # (B, ..., R)
    h = h * mask.view(len(adapter_names), *([1] * (h.dim() - 2)), -1)
    delta = tiled(functools.partial(torch.nn.functional.linear, weight=stack.b), h)  # (B, ..., out)
    return result + delta.to(result.dtype)


def _stack(layer: Any) -> _Stack | None:
    """The layer's stack for the adapters it holds now; None where PEFT's path must run."""
    if layer.training or layer.merged or layer.disable_adapters:
        return None
    keys = tuple(layer.lora_A)
    built = layer.__dict__.get(_STACK)
    if built is None or built[0] != keys:
        built = (keys, _build(layer, keys))
        layer.__dict__[_STACK] = built
    return built[1]


def _build(layer: Any, keys: tuple[str, ...]) -> _Stack | None:
    if not keys:
        return None
    a = [layer.lora_A[k].weight for k in keys]
    b = [layer.lora_B[k].weight for k in keys]
    plain = all(k not in layer.lora_variant and not layer.lora_bias.get(k, False)
                and isinstance(layer.scaling[k], (int, float)) for k in keys)
    if not plain or len({(w.dtype, w.device) for w in a + b}) != 1:
        return None
    # Normal tensors even when the first forward runs in inference mode: a later forward outside it (eval under
    # no_grad) may then use them too.
    with torch.inference_mode(False), torch.no_grad():
        return _Stack(tuple((k, w.shape[0]) for k, w in zip(keys, a)), torch.cat(a),
                      torch.cat([w * layer.scaling[k] for k, w in zip(keys, b)], dim=1))


@functools.lru_cache(maxsize=64)
def _mask(names: tuple[str, ...], layout: tuple[tuple[str, int], ...], dtype: torch.dtype,
          device: torch.device) -> torch.Tensor | None:
    """(rows, sum r): 1 in each row's own adapter's columns; None when no row names an adapter the layer holds
    (a batch of base rows costs what the base does). Layers that hold the same adapters share one per batch."""
    columns, start = {}, 0
    for key, rank in layout:
        columns[key] = slice(start, start + rank)
        start += rank
    if not columns.keys() & set(names):  # "__base__", and adapters this layer does not hold, add nothing (as in PEFT)
        return None
    with torch.inference_mode(False):
        mask = torch.zeros(len(names), start, dtype=dtype, device=device)
        for row, name in enumerate(names):
            if name in columns:
                mask[row, columns[name]] = 1
    return mask


@functools.cache
def _covered_types() -> tuple[type, ...]:
    from peft.tuners.lora import bnb
    from peft.tuners.lora.layer import Linear

    return (Linear, *(getattr(bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, name)))
