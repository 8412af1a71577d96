"""QLoRA training quality: lorachat's preparation against PEFT's, on the bundled model in 4-bit on this CPU.

lorachat keeps a quantized base's embeddings, LM head and norms in the compute dtype and runs LoRA's matmuls in it
over fp32 master weights (train/lora_compute.py); PEFT's `prepare_model_for_kbit_training` casts every unquantized
weight to fp32 and LoRA casts its inputs to fp32. Both sides train `recipes/qlora.yaml` on the same rows with the
same seed, in fresh processes; a second lorachat run with another seed gives the noise floor. Quality holds when the
two preparations differ by no more than two seeds of the same one do: on each logged training loss and on the
held-out eval loss (rows neither side trains on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cli import bench_main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "qlora.yaml"
SIDES = ("lorachat", "peft")


def _peft_preparation() -> None:
    """The model lorachat builds, prepared as PEFT prepares a k-bit base, LoRA computing as PEFT computes it."""
    from peft import prepare_model_for_kbit_training

    import lora_chat.models as models
    import lora_chat.train.run as run

    plain = models.load_model

    def load_model(*args, **kwargs):
        return prepare_model_for_kbit_training(plain(*args, **kwargs), use_gradient_checkpointing=False)

    models.load_model = load_model
    run.compute_lora_in_base_dtype = lambda model, dtype: None


def worker(side: str, seed: int, steps: int) -> None:
    from lora_chat.recipe import load_recipe
    from lora_chat.train import Options, finetune

    if side == "peft":
        _peft_preparation()
    out = Path(tempfile.mkdtemp()) / "adapter"
    loaded = load_recipe(RECIPE, [f"training.max_steps={steps}", f"training.seed={seed}", f"output.dir={out}",
                                  "training.grad_accum=4", "training.log_every=2", "training.save_every=1000"])
    finetune(loaded, Options())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    print("RESULT " + json.dumps({"losses": [entry["loss"] for entry in log if "loss" in entry],
                                  "eval_loss": metrics["eval"]["loss"], "dtype": metrics.get("dtype")}), flush=True)


def measure(side: str, seed: int, steps: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", side, "--seed", str(seed), "--steps", str(steps)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{side} worker failed:\n{proc.stderr[-3000:]}")


def _gap(a: dict, b: dict) -> tuple[float, float]:
    """Mean |difference| of the logged training losses, and |difference| of the eval losses."""
    pairs = list(zip(a["losses"], b["losses"]))
    return sum(abs(x - y) for x, y in pairs) / len(pairs), abs(a["eval_loss"] - b["eval_loss"])


def results(quick: bool) -> list[dict]:
    steps = 8 if quick else 16
    ours, peft, reseeded = measure("lorachat", 42, steps), measure("peft", 42, steps), measure("lorachat", 43, steps)
    for name, run in (("lorachat seed 42", ours), ("peft seed 42", peft), ("lorachat seed 43", reseeded)):
        print(f"  {name:17s} eval {run['eval_loss']:.4f}  train " + " ".join(f"{x:.3f}" for x in run["losses"]))
    (train_gap, eval_gap), (train_noise, eval_noise) = _gap(ours, peft), _gap(ours, reseeded)
    return [
        {"name": f"qlora_train_loss_gap ({steps} steps, mean over logged steps)", "value": round(train_gap, 4),
         "unit": "nats", "baseline": "lorachat, another seed", "baseline_value": round(train_noise, 4),
         "ratio": round(train_gap / train_noise, 2), "goal": "<= 1 (within seed noise)"},
        {"name": f"qlora_eval_loss_gap ({steps} steps)", "value": round(eval_gap, 4), "unit": "nats",
         "baseline": "lorachat, another seed", "baseline_value": round(eval_noise, 4),
         "ratio": round(eval_gap / eval_noise, 2), "goal": "<= 1 (within seed noise)"},
        {"name": "qlora_eval_loss (lorachat / peft preparation)", "value": round(ours["eval_loss"], 4),
         "unit": "nats", "baseline": "PEFT prepare_model_for_kbit_training", "baseline_value":
         round(peft["eval_loss"], 4), "ratio": round(ours["eval_loss"] / peft["eval_loss"], 3), "goal": "(info)"},
    ]


def main() -> None:
    bench_main(__doc__, "8 optimizer steps a run instead of 16.", SIDES,
               lambda args: worker(args.worker, args.seed, args.steps), results, {"--seed": {"type": int}})


if __name__ == "__main__":
    main()
