"""lorachat DPO vs plain TRL `DPOTrainer` + PEFT with its defaults, and vs lorachat SFT on the same rows.

    HF_HUB_OFFLINE=1 python bench/bench_dpo.py [--quick]

The rows are real: the first 64 quickstart FAQ pairs (bench_train's file), each answer chosen and the next row's
answer rejected (a fluent reply to another question). Each configuration trains in a fresh subprocess
(bench_train.measure) for one epoch over the same rows (64; 32 with --quick), the kinds taking turns, so each
side does all the work the run needs (a precomputed reference pass covers exactly the rows trained):
  - `sft`: lorachat SFT (`training.method: sft`) on the same preference file, i.e. on the chosen replies, recipe
    defaults otherwise: the memory a DPO run is held against (goal: DPO peak RSS <= 1.15x, no reference copy);
  - `lorachat-dpo`: the same recipe with `training.method: dpo`;
  - `trl-dpo`: `DPOConfig()` defaults (8 pairs per step, gradient checkpointing on, the reference forward in every
    step, TRL's tokenization of the conversational rows) with LoRA r=16 alpha=32 on all linear layers (lorachat's
    defaults), `bf16` set to what lorachat's `dtype: auto` picks (bench_train's `trl-same-dtype`: TRL's emulated
    bf16 autocast on a CPU without native bf16 would otherwise dominate the ratio);
  - `trl-dpo-tuned` (full run only, for information): the same with `precompute_ref_log_probs=True` and
    gradient checkpointing off, lorachat's two main choices, to show what is left once TRL is told them.
Tokens are the real (non-pad) tokens of both sides of every pair trained; seconds are training time plus, where the
reference is precomputed, the reference pass (it is work the run needs; TRL's defaults do it inside each step).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import MODEL, _data_file, measure  # noqa: E402 - the shared subprocess runner and FAQ rows
from cli import bench_main  # noqa: E402

KINDS = ("sft", "lorachat-dpo", "trl-dpo", "trl-dpo-tuned")


def _pairs(folder: Path, n: int) -> list[dict]:
    """The first `n` FAQ rows as pairs in TRL's conversational explicit-prompt shape, which lorachat reads too."""
    rows = [json.loads(line)["conversations"] for line in _data_file(folder).read_text().splitlines()[:n]]
    return [{"prompt": [{"role": "user", "content": turns[0]["value"]}],
             "chosen": [{"role": "assistant", "content": turns[1]["value"]}],
             "rejected": [{"role": "assistant", "content": rows[(i + 1) % len(rows)][1]["value"]}]}
            for i, turns in enumerate(rows)]


def _timed_reference_pass() -> dict:
    """Wrap TRL's reference pass (run in DPOTrainer.__init__ when precomputing) to add its time to the run's."""
    from trl import DPOTrainer

    spent = {"s": 0.0}
    real = DPOTrainer._precompute_ref_logps

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return real(self, *args, **kwargs)
        finally:
            spent["s"] += time.perf_counter() - start

    DPOTrainer._precompute_ref_logps = timed
    return spent


def run_lorachat(rows: int, method: str) -> dict:
    import yaml

    from lora_chat.recipe import load_recipe
    from lora_chat.train import Options
    from lora_chat.train.preference import finetune as finetune_pairs
    from lora_chat.train.run import finetune

    spent = _timed_reference_pass()
    folder = Path(tempfile.mkdtemp())
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _pairs(folder, rows)), encoding="utf-8")
    recipe = {"name": "bench", "base": {"model": MODEL},
              "data": {"train": [{"path": str(data), "format": "preference"}], "eval": {"split": 0}},
              "training": {"epochs": 1, "method": method}, "output": {"dir": str(folder / "adapter")}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    (finetune if method == "sft" else finetune_pairs)(load_recipe(folder / "recipe.yaml"), Options())
    metrics = json.loads((folder / "adapter" / "metrics.json").read_text())["train"]
    return {"tokens": metrics["tokens"], "seconds": metrics["runtime_s"] + spent["s"]}


def run_trl(rows: int, tuned: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from lora_chat.models import load_tokenizer, pick_dtype, resolve_base

    spent = _timed_reference_pass()
    base = resolve_base(MODEL, need_weights=True)
    extra = {"precompute_ref_log_probs": True, "gradient_checkpointing": False} if tuned else {}
    config = DPOConfig(output_dir=tempfile.mkdtemp(), num_train_epochs=1, report_to=[], save_strategy="no",
                       disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                       bf16=pick_dtype("auto") == torch.bfloat16, **extra)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=str(base.path), args=config, processing_class=load_tokenizer(base),
                         train_dataset=Dataset.from_list(_pairs(Path(tempfile.mkdtemp()), rows)), peft_config=lora)
    result = trainer.train()
    tokens = max(float(entry["num_tokens"]) for entry in trainer.state.log_history if "num_tokens" in entry)
    return {"tokens": tokens, "seconds": result.metrics["train_runtime"] + spent["s"]}


def worker(kind: str, rows: int) -> None:
    result = run_trl(rows, tuned=kind == "trl-dpo-tuned") if kind.startswith("trl") else \
        run_lorachat(rows, "sft" if kind == "sft" else "dpo")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def results(quick: bool) -> list[dict]:
    rows, repeats = (32, 1) if quick else (64, 3)
    kinds = KINDS[:3] if quick else KINDS
    samples: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for _ in range(repeats):
        for kind in kinds:
            samples[kind].append(measure(kind, rows, script=__file__))  # its --steps carries the rows
    runs = {kind: {key: statistics.median(r[key] for r in rs) for key in ("tokens_per_s", "peak_rss_mb")}
            for kind, rs in samples.items()}
    dpo = runs["lorachat-dpo"]
    found = [{"name": "dpo_peak_rss (lorachat DPO vs lorachat SFT, same rows)", "value": round(dpo["peak_rss_mb"]),
              "unit": "MB", "baseline": "lorachat SFT", "baseline_value": round(runs["sft"]["peak_rss_mb"]),
              "ratio": round(dpo["peak_rss_mb"] / runs["sft"]["peak_rss_mb"], 2), "goal": "<= 1.15"}]
    for baseline in kinds[2:]:
        goal = ">= 1.3" if baseline == "trl-dpo" else "(info)"
        found.append({"name": f"dpo_tokens_per_s (lorachat DPO vs {baseline})", "value": round(dpo["tokens_per_s"], 1),
                      "unit": "real tok/s", "baseline": f"TRL DPOTrainer {baseline}",
                      "baseline_value": round(runs[baseline]["tokens_per_s"], 1),
                      "ratio": round(dpo["tokens_per_s"] / runs[baseline]["tokens_per_s"], 2), "goal": goal})
        found.append({"name": f"dpo_peak_rss (lorachat DPO vs {baseline}, information)",
                      "value": round(dpo["peak_rss_mb"]), "unit": "MB", "baseline": f"TRL DPOTrainer {baseline}",
                      "baseline_value": round(runs[baseline]["peak_rss_mb"]),
                      "ratio": round(dpo["peak_rss_mb"] / runs[baseline]["peak_rss_mb"], 2), "goal": "(info)"})
    return found


def main() -> None:
    bench_main(__doc__, "32 rows, one run a side, no tuned TRL row.", KINDS,
               lambda args: worker(args.worker, args.steps), results)


if __name__ == "__main__":
    main()
