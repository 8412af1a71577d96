"""lorachat's recipe defaults vs plain TRL `SFTTrainer` defaults: real tokens/s and peak memory, SmolLM2-135M.

    HF_HUB_OFFLINE=1 python bench/bench_train.py [--quick]

The data are the first 64 rows of the quickstart FAQ (English, ShareGPT). Each configuration trains in a fresh
subprocess (so its peak RSS is its own) for a few optimizer steps:
  - `trl`: `SFTConfig()` defaults (8 rows per step, no packing, gradient checkpointing on, bf16 autocast over fp32
    weights, full-sequence loss) with LoRA r=16 alpha=32 on all linear layers, as lorachat's defaults have;
  - `trl-same-dtype`: the same with `bf16` set to what lorachat's `dtype: auto` picks on this machine. On a CPU
    without native bf16 (no AVX512-BF16/AMX), TRL's default bf16 autocast runs emulated and is several times
    slower than float32, which lorachat picks there; this baseline keeps that gap out of the ratio. Where bf16 is
    native both sides run it, and this row measures the same thing as the first;
  - `lorachat`: a recipe that sets only the base, the data and the step count: every training default as shipped;
  - `trl-qlora` and `lorachat-qlora`: QLoRA on the same rows, the base in bitsandbytes nf4 with double
    quantization, gradient checkpointing on for both. TRL's side is the recipe its docs and PEFT's give: a
    `BitsAndBytesConfig` base through peft's `prepare_model_for_kbit_training`, then `SFTTrainer` with a LoRA
    config, bf16 as lorachat's dtype picks. lorachat's side is a recipe with `base.quantization: 4bit` and
    `training.gradient_checkpointing: true` (goals: peak RSS <= 0.7x, tokens/s >= 1.3x);
  - `lorachat-packed` (full run only, for information): the same with `training.packing: true`. A packed
    micro-batch is `batch_size` rows of `max_length` (4 x 2048) tokens against ~4 x 130 unpacked FAQ pairs, so
    its activations are ~15x larger; that is why packing is not the default.
`lorachat` is compared with each TRL baseline on real (non-pad) input tokens per second of training time
(`train_tokens_per_s`, goal >= 1.3, stretch 2) and on peak RSS (`train_peak_rss`, goal <= 1.0): the median of
3 runs of 8 optimizer steps a side (TRL's defaults: one run), the sides taking turns. The runs do different
amounts of work per step, which is the point: a user who writes nothing gets these defaults. `--quick` runs
2 runs of 2 steps a side, and only the `trl-same-dtype` baseline (TRL's emulated bf16 alone takes minutes a
step here).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cli import bench_main  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DATA = "data/faq-en-sharegpt.jsonl"  # in the zaragoza_construction_faq package
ROWS = 64
KINDS = ("trl", "trl-same-dtype", "lorachat", "lorachat-packed", "trl-qlora", "lorachat-qlora")


def _data_file(folder: Path) -> Path:
    from importlib.resources import files

    lines = (files("zaragoza_construction_faq") / DATA).read_text(encoding="utf-8").splitlines()[:ROWS]
    path = folder / "faq-64.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_lorachat(steps: int, packing: bool, qlora: bool = False) -> dict:
    import yaml

    from lora_chat.recipe import load_recipe
    from lora_chat.train import Options, finetune

    folder = Path(tempfile.mkdtemp())
    recipe = {"name": "bench", "base": {"model": MODEL},
              "data": {"train": [{"path": str(_data_file(folder)), "format": "sharegpt"}], "eval": {"split": 0}},
              "training": {"max_steps": steps, **({"packing": True} if packing else {}),
                           **({"gradient_checkpointing": True} if qlora else {})},
              **({"base": {"model": MODEL, "quantization": "4bit"}} if qlora else {}),
              "output": {"dir": str(folder / "adapter")}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    finetune(load_recipe(folder / "recipe.yaml"), Options())
    metrics = json.loads((folder / "adapter" / "metrics.json").read_text())["train"]
    return {"tokens": metrics["tokens"], "seconds": metrics["runtime_s"]}


def run_trl(steps: int, same_dtype: bool, qlora: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lora_chat.data.formats import to_conversation
    from lora_chat.errors import Where
    from lora_chat.models import load_tokenizer, pick_dtype, resolve_base

    base = resolve_base(MODEL, need_weights=True)
    path = _data_file(Path(tempfile.mkdtemp()))
    rows = [to_conversation(json.loads(line), "sharegpt", Where(path, n)).as_dicts()
            for n, line in enumerate(path.read_text().splitlines(), 1)]
    dtype = {"bf16": pick_dtype("auto") == torch.bfloat16} if same_dtype else {}
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, report_to=[], save_strategy="no",
                       disable_tqdm=True, use_cpu=not torch.cuda.is_available(), **dtype)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")  # PEFT: no dropout
    model = str(base.path)
    if qlora:
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        compute = torch.bfloat16 if dtype.get("bf16") else torch.float32
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(model, quantization_config=quant, dtype=compute)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list([{"messages": m} for m in rows]),
                         processing_class=load_tokenizer(base), peft_config=lora)
    result = trainer.train()
    # TRL's own count of real (attention-mask) tokens trained; counting in the collator would also count the batch
    # the dataloader prefetches after the last step.
    tokens = max(float(entry["num_tokens"]) for entry in trainer.state.log_history if "num_tokens" in entry)
    return {"tokens": tokens, "seconds": result.metrics["train_runtime"]}


def worker(kind: str, steps: int) -> None:
    if kind.startswith("trl"):
        result = run_trl(steps, same_dtype=kind != "trl", qlora=kind == "trl-qlora")
    else:
        result = run_lorachat(steps, packing=kind == "lorachat-packed", qlora=kind == "lorachat-qlora")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def measure(kind: str, steps: int, script: str = __file__) -> dict:
    """`script --worker KIND --steps N` in a fresh process (its peak RSS its own); its RESULT line, with tokens/s."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, script, "--worker", kind, "--steps", str(steps)], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            result["tokens_per_s"] = result["tokens"] / result["seconds"]
            return result
    raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")


def median_runs(kinds: tuple[str, ...], steps: int, repeats: int) -> dict[str, dict]:
    """Each kind `repeats` times, the kinds taking turns (so a slow spell of a shared machine hits both sides), and
    per kind the median tokens/s and peak RSS. `trl` runs once: where bf16 is emulated one run takes many
    minutes, and its noise is small beside its gap."""
    samples: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for round_ in range(repeats):
        for kind in kinds:
            if kind != "trl" or round_ == 0:
                samples[kind].append(measure(kind, steps))
    return {kind: {key: statistics.median(run[key] for run in runs) for key in ("tokens_per_s", "peak_rss_mb")}
            for kind, runs in samples.items()}


def results(quick: bool) -> list[dict]:
    steps, repeats = (2, 2) if quick else (8, 3)
    kinds = ("trl-same-dtype", "lorachat", "trl-qlora", "lorachat-qlora") if quick else KINDS
    runs = median_runs(kinds, steps, repeats)
    found = []

    def compare(kind: str, baseline: str, label: str, goals: tuple[str, str]) -> None:
        run, base = runs[kind], runs[baseline]
        found.append({"name": f"train_tokens_per_s ({label})", "value": round(run["tokens_per_s"], 1),
                      "unit": "real tok/s", "baseline": f"TRL SFTTrainer {baseline}",
                      "baseline_value": round(base["tokens_per_s"], 1),
                      "ratio": round(run["tokens_per_s"] / base["tokens_per_s"], 2), "goal": goals[0]})
        found.append({"name": f"train_peak_rss ({label})", "value": round(run["peak_rss_mb"]), "unit": "MB",
                      "baseline": f"TRL SFTTrainer {baseline}", "baseline_value": round(base["peak_rss_mb"]),
                      "ratio": round(run["peak_rss_mb"] / base["peak_rss_mb"], 2), "goal": goals[1]})

    for baseline in kinds:
        if baseline in ("trl", "trl-same-dtype"):
            compare("lorachat", baseline, f"lorachat defaults vs {baseline}", (">= 1.3", "<= 1.0"))
    compare("lorachat-qlora", "trl-qlora", "QLoRA, checkpointing on both", (">= 1.3", "<= 0.7"))
    if "lorachat-packed" in runs:
        compare("lorachat-packed", "trl", "packing: true vs trl, information", ("(info)", "(info)"))
    return found


def main() -> None:
    bench_main(__doc__, "1 optimizer step, lorachat vs TRL in its dtype only.", KINDS,
               lambda args: worker(args.worker, args.steps), results)


if __name__ == "__main__":
    main()
