"""lorachat's recipe defaults vs plain TRL `SFTTrainer` defaults: real tokens/s and peak memory, SmolLM2-135M.

    HF_HUB_OFFLINE=1 python bench/bench_train.py [--quick]

The data are the first 64 rows of the quickstart FAQ (English, ShareGPT). Each configuration trains in a fresh
subprocess (so its peak RSS is its own) for a few optimizer steps:
  - `trl`: `SFTConfig()` defaults (8 rows per step, no packing, gradient checkpointing on, bf16 autocast over fp32
    weights, full-sequence loss) with LoRA r=16 alpha=32 on all linear layers, as lorachat's defaults have;
  - `lorachat`: a recipe that sets only the base, the data and the step count: every training default as shipped;
  - `lorachat-packed`: the same with `training.packing: true`.
Each is compared with `trl` on real (non-pad) input tokens per second of training time (goal >= 1.0: faster) and on
peak RSS (goal <= 1.0: no larger). The runs do different amounts of work per step, which is the point: a user who
writes nothing gets these defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DATA = "data/faq-en-sharegpt.jsonl"  # in the zaragoza_construction_faq package
ROWS = 64
KINDS = ("trl", "lorachat", "lorachat-packed")


def _data_file(folder: Path) -> Path:
    from importlib.resources import files

    lines = (files("zaragoza_construction_faq") / DATA).read_text(encoding="utf-8").splitlines()[:ROWS]
    path = folder / "faq-64.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_lorachat(steps: int, packing: bool) -> dict:
    import yaml

    from lora_chat.recipe import load_recipe
    from lora_chat.train import Options, finetune

    folder = Path(tempfile.mkdtemp())
    recipe = {"name": "bench", "base": {"model": MODEL},
              "data": {"train": [{"path": str(_data_file(folder)), "format": "sharegpt"}], "eval": {"split": 0}},
              "training": {"max_steps": steps, **({"packing": True} if packing else {})},
              "output": {"dir": str(folder / "adapter")}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    finetune(load_recipe(folder / "recipe.yaml"), Options())
    metrics = json.loads((folder / "adapter" / "metrics.json").read_text())["train"]
    return {"tokens": metrics["tokens"], "seconds": metrics["runtime_s"]}


def run_trl(steps: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lora_chat.data.formats import to_conversation
    from lora_chat.errors import Where
    from lora_chat.models import load_tokenizer, resolve_base

    base = resolve_base(MODEL, need_weights=True)
    path = _data_file(Path(tempfile.mkdtemp()))
    rows = [to_conversation(json.loads(line), "sharegpt", Where(path, n)).as_dicts()
            for n, line in enumerate(path.read_text().splitlines(), 1)]
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, report_to=[], save_strategy="no",
                       disable_tqdm=True, use_cpu=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=str(base.path), args=config, train_dataset=Dataset.from_list([{"messages": m} for m in rows]),
                         processing_class=load_tokenizer(base), peft_config=lora)
    seen = {"tokens": 0}
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting  # read when train() builds its dataloader
    result = trainer.train()
    return {"tokens": seen["tokens"], "seconds": result.metrics["train_runtime"]}


def worker(kind: str, steps: int) -> None:
    result = run_trl(steps) if kind == "trl" else run_lorachat(steps, packing=kind == "lorachat-packed")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def measure(kind: str, steps: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--steps", str(steps)], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            result["tokens_per_s"] = result["tokens"] / result["seconds"]
            return result
    raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")


def results(quick: bool) -> list[dict]:
    steps = 3 if quick else 8
    runs = {kind: measure(kind, steps) for kind in KINDS}
    trl = runs["trl"]
    found = []
    for kind in KINDS[1:]:
        run = runs[kind]
        found.append({"name": f"{kind} defaults: real tokens/s", "value": round(run["tokens_per_s"], 1),
                      "unit": "tok/s", "baseline": "TRL SFTTrainer defaults",
                      "baseline_value": round(trl["tokens_per_s"], 1),
                      "ratio": round(run["tokens_per_s"] / trl["tokens_per_s"], 2), "goal": ">= 1.0"})
        found.append({"name": f"{kind} defaults: peak RSS", "value": round(run["peak_rss_mb"]), "unit": "MB",
                      "baseline": "TRL SFTTrainer defaults", "baseline_value": round(trl["peak_rss_mb"]),
                      "ratio": round(run["peak_rss_mb"] / trl["peak_rss_mb"], 2), "goal": "<= 1.0"})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 optimizer steps per configuration instead of 8.")
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    for r in results(args.quick):
        print(f"{r['name']:42s} {r['value']:>9} {r['unit']:5s} vs {r['baseline_value']:>9} ({r['baseline']}): "
              f"{r['ratio']:.2f}x (goal {r['goal']})")


if __name__ == "__main__":
    main()
