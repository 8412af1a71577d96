"""Where a quickstart training step spends its time: torch profiler over a few steps, grouped by job.

    HF_HUB_OFFLINE=1 python bench/profile_step.py [--steps 4] [--set training.lora.dropout=0]

Builds the quickstart run as `lorachat finetune` does (recipe, rows, collator, the model with LoRA, lorachat's
loss, AdamW) and profiles micro-steps after one warm-up. Operators are grouped into: the base model's matmuls,
LoRA's matmuls (one side of rank r), attention (SDPA), dropout, norms and activations, the loss (projection onto
the vocabulary, log-sum-exp, its gradient), the optimizer, collation, and the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="Profiled micro-steps (after one warm-up).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Recipe override.")
    parser.add_argument("--top", type=int, default=0, help="Also list the N operators with the most self time.")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from lora_chat.encoding import prepare
    from lora_chat.inputs import load_inputs
    from lora_chat.train.collate import Collator, to_rows
    from lora_chat.train.loss import TrainedPositions, token_loss_sum
    from lora_chat.recipe import load_recipe
    from lora_chat.train.run import build_model
    from lora_chat.models import pick_dtype
    from lora_chat.train.checkpointing import decide

    inputs = load_inputs(load_recipe(ROOT / "recipes" / "quickstart.yaml", args.overrides), need_weights=True)
    recipe = inputs.loaded.recipe
    prepared = prepare(inputs.loaded, inputs.data, inputs.template)
    rows = to_rows(prepared.train, recipe.training.packing, recipe.data.max_length)
    checkpointing = decide(inputs.loaded, prepared.stats["train"], inputs.base, pick_dtype(recipe.base.dtype))
    print(f"gradient checkpointing {checkpointing}")
    model = build_model(inputs, meta=False)
    if checkpointing.on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    rank = recipe.lora.r
    selector = TrainedPositions(model.get_output_embeddings())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collate = Collator(pad_id=inputs.tokenizer.pad_token_id)
    b = recipe.training.batch_size

    def step(i: int) -> int:
        with record_function("#collate"):
            batch = collate(rows[i * b:(i + 1) * b])
        with record_function("#forward+loss"):
            loss, trained = token_loss_sum(model, selector, batch)
        with record_function("#backward"):
            (loss / max(trained, 1)).backward()
        with record_function("#optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return int(batch["real_tokens"])

    step(0)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        tokens = sum(step(i) for i in range(1, args.steps + 1))
    seconds = time.perf_counter() - start
    groups: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        groups[_group(event.key, event.input_shapes, rank)] += event.self_cpu_time_total
    total = sum(groups.values())
    print(f"{args.steps} micro-steps, {tokens} real tokens, {seconds:.1f} s under the profiler "
          f"({tokens / seconds:.0f} tokens/s), threads {torch.get_num_threads()}, dtype {model.dtype}")
    phases = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key.startswith("#")}
    print("phases: " + ", ".join(f"{k[1:]} {100 * v / sum(phases.values()):.1f}%" for k, v in phases.items()))
    for name, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {name:34s} {100 * us / total:5.1f}%  {us / 1e6 / args.steps:6.3f} s/step")
    if args.top:
        events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        for e in events[:args.top]:
            print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  x{e.count:<5d} {e.key:40s} {str(e.input_shapes)[:90]}")


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def _group(op: str, shapes: list, rank: int) -> str:
    flat = [d for shape in shapes if isinstance(shape, (list, tuple)) for d in shape if isinstance(d, int)]
    if op.startswith("#"):
        return "python around the phases"  # record_function's own (self) time
    if op in MATMULS:
        return "LoRA matmuls (rank-r side)" if rank in flat else "base matmuls (and LM head)"
    if "scaled_dot_product" in op or "flash_attention" in op or "_efficient_attention" in op:
        return "attention (SDPA)"
    if "dropout" in op or op in ("aten::bernoulli_", "aten::native_dropout", "aten::native_dropout_backward"):
        return "dropout"
    if any(k in op for k in ("logsumexp", "exp", "gather", "sub_", "index_put", "index")):
        return "loss (log-sum-exp, gather, grads)"
    if any(k in op for k in ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "sqrt")):
        return "optimizer (AdamW)"
    if any(k in op for k in ("silu", "pow", "rsqrt", "mean", "mul", "neg", "cat", "add")):
        return "elementwise (norms, SwiGLU, RoPE, adds)"
    if any(k in op for k in ("copy_", "to", "_to_copy", "clone", "contiguous", "empty", "zeros", "fill_", "full")):
        return "copies and casts"
    return "other"


if __name__ == "__main__":
    main()
