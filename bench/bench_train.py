"""lorachat's trainer vs plain TRL `SFTTrainer` + PEFT defaults, on the quickstart recipe and the bundled SmolLM2.

    HF_HUB_OFFLINE=1 python bench/bench_train.py --steps 10

Each configuration trains `--steps` optimizer steps in a fresh subprocess (so peak RSS is its own), with the same
model, data, seed, batch size and accumulation; then the ratios are printed:
  - real (non-pad) input tokens per second of training time, lorachat / TRL (goal >= 1.3x, with packing);
  - peak RSS, lorachat / TRL (goal <= 1.0x), and QLoRA (4-bit base) / LoRA. lorachat runs the recipe as
    written (one packed row of <= 512 tokens per micro-batch, gradient checkpointing on), and again as
    `lorachat-nockpt` without gradient checkpointing, to show what that memory costs in speed;
  - achieved FLOP/s as a share of this CPU's matmul peak measured in the same run. Useful work per token is
    ~4 x non-embedding params for a frozen base (forward 2P, input-gradients 2P; LoRA's own is negligible)
    plus attention (fwd+bwd ~ 3 x 4 x layers x hidden x mean context / 2, causal). The same formula is applied to
    both trainers, so wasted work (padding, logits at prompt positions) lowers utilisation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def matmul_gflops(dtype_name: str, n: int = 1024, seconds: float = 1.5) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_lorachat(steps: int, quantization: str, checkpointing: bool) -> dict:
    from lora_chat.train import Options, finetune

    out = Path(tempfile.mkdtemp()) / "adapter"
    overrides = [f"training.max_steps={steps}", f"output.dir={out}", "training.save_every=null",
                 "training.log_every=1", "data.eval.split=0", f"base.quantization={quantization}"]
    if not checkpointing:
        overrides.append("training.gradient_checkpointing=false")
    finetune(RECIPE, overrides, Options())
    metrics = json.loads((out / "metrics.json").read_text())["train"]
    lengths = [json.loads(line)["tokens"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"tokens": metrics["tokens"], "seconds": metrics["runtime_s"], "rows": metrics["rows"],
            "mean_context": _mean_context(out), "steps_logged": len(lengths)}


def _mean_context(out: Path) -> float:
    # Packed rows hold several samples; attention spans one sample, so the mean sample length is what counts.
    from lora_chat.encoding import prepare
    from lora_chat.inputs import load_inputs

    inputs = load_inputs(RECIPE, ["data.eval.split=0"])
    train = prepare(inputs.loaded, inputs.data, inputs.template).train
    return sum(len(s.input_ids) for s in train) / len(train)


def run_trl(steps: int) -> dict:
    """TRL's defaults: SFTConfig() (bf16 autocast, no packing, full-sequence loss) + LoraConfig(all-linear)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lora_chat.models import resolve_base
    from lora_chat.inputs import load_inputs

    inputs = load_inputs(RECIPE, ["data.eval.split=0"])
    recipe = inputs.loaded.recipe
    rows = [{"messages": inputs.template.messages_of(c)} for c in inputs.data.train]
    base = resolve_base(MODEL, need_weights=True)
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=recipe.training.batch_size,
                       gradient_accumulation_steps=recipe.training.grad_accum, learning_rate=recipe.training.lr,
                       seed=recipe.training.seed, max_length=recipe.data.max_length, report_to=[],
                       save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True)
    lora = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=str(base.path), args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=inputs.tokenizer, peft_config=lora)
    seen = {"tokens": 0, "lengths": []}
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        mask = batch.get("attention_mask")
        seen["tokens"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        seen["lengths"] += [len(e["input_ids"]) for e in examples]
        return batch

    trainer.data_collator = counting
    trainer.train_dataset  # noqa: B018 - tokenised already, so only training is timed below
    trainer.get_train_dataloader = _with_collator(trainer.get_train_dataloader, trainer, counting)
    result = trainer.train()
    lengths = seen["lengths"]
    return {"tokens": seen["tokens"], "seconds": result.metrics["train_runtime"],
            "mean_context": sum(lengths) / max(len(lengths), 1)}


def _with_collator(original, trainer, collator):
    def get():
        trainer.data_collator = collator
        return original()
    return get


def worker(kind: str, steps: int) -> None:
    if kind == "trl":
        result = run_trl(steps)
    else:
        result = run_lorachat(steps, "4bit" if kind == "qlora" else "none", checkpointing=kind != "lorachat-nockpt")
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def measure(kind: str, steps: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--steps", str(steps)], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")


def flops_per_token(mean_context: float) -> float:
    from lora_chat.models import model_facts, resolve_base

    base = resolve_base(MODEL, need_weights=False)
    config = json.loads((base.path / "config.json").read_text())
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    kv = h * config.get("num_key_value_heads", config["num_attention_heads"]) // config["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o, k, v, gate/up/down
    lm_head = model_facts(base)["vocab_size"] * h
    params = layers * per_layer + lm_head
    attention = 3 * 4 * layers * h * mean_context / 2
    return 4 * params + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="Optimizer steps per configuration.")
    parser.add_argument("--worker", choices=["lorachat", "lorachat-nockpt", "trl", "qlora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    from lora_chat.models import pick_dtype

    peaks = {name: matmul_gflops(name) for name in ("bfloat16", "float32")}
    print(f"matmul peak (1024^3): bf16 {peaks['bfloat16']:.0f} GFLOP/s, fp32 {peaks['float32']:.0f} GFLOP/s; "
          f"lorachat compute dtype: {pick_dtype('auto')}")
    results = {kind: measure(kind, args.steps) for kind in ("lorachat", "lorachat-nockpt", "trl", "qlora")}
    for kind, r in results.items():
        tps = r["tokens"] / r["seconds"]
        gflops = tps * flops_per_token(r["mean_context"]) / 1e9
        r.update(tokens_per_s=tps, gflops=gflops)
        print(f"{kind:13s} {r['tokens']:7d} real tokens in {r['seconds']:6.1f}s = {tps:7.0f} tok/s, "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB, {gflops:5.1f} GFLOP/s = "
              f"{100 * gflops / peaks['bfloat16']:.0f}% of bf16 peak ({100 * gflops / peaks['float32']:.0f}% of fp32)")
    trl, q = results["trl"], results["qlora"]
    for kind in ("lorachat", "lorachat-nockpt"):
        lc = results[kind]
        print(f"{kind:13s} / TRL: real tokens/s {lc['tokens_per_s'] / trl['tokens_per_s']:.2f}x (goal >= 1.3x), "
              f"peak RSS {lc['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x (goal <= 1.0x)")
    print(f"QLoRA / LoRA: peak RSS {q['peak_rss_mb'] / results['lorachat']['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
