"""Four adapters in one joint run vs the same four runs one after another, on the bundled SmolLM2-135M.

    HF_HUB_OFFLINE=1 python bench/bench_joint.py [--quick]

The adapters are the user's family of README's quickstart: FAQ en (recipes/quickstart.yaml), FAQ sv
(quickstart-sv.yaml), small talk en (smalltalk-en.yaml) and small talk sv (smalltalk-sv.yaml), each cut to a few
optimizer steps with `--set training.max_steps=S --set training.grad_accum=G` (the same for every run).

  - time and memory: the sequential side runs `lorachat finetune R` four times, each a fresh process as a user
    starts it; the joint side runs `lorachat finetune R1 R2 R3 R4` once. The sides take turns (sequential, joint,
    and again in the full run; the median of each). Wall time is the whole command's, startup and eval included;
    peak RSS is each process's own (the sequential side's is the largest of its four). Goals: joint <= 0.6x the
    wall time, <= 1.25x the peak RSS of one run.
  - the same adapters (2 steps of one packed row of at most 128 tokens, no eval split, on each side): in one
    process each adapter is trained alone (train.finetune, the single-run path) and all
    four jointly (train.joint), in float32 with the batch-invariant kernels (runtime/invariant.py: every linear layer
    on fixed tiles of rows, so a row's forward does not depend on the rows beside it), and the largest |weight
    difference| over all four adapters is reported (goal <= 1e-5); then the same in bfloat16, for information.
  - the same report: `lorachat eval` of the four joint adapters against the base and of the four sequential ones
    (the adapters of the timing runs): every adapter's loss and reply metrics from the joint run must lie inside
    the 95% interval of the same adapter trained alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("quickstart.yaml", "quickstart-sv.yaml", "smalltalk-en.yaml", "smalltalk-sv.yaml")
LORACHAT = Path(sys.executable).parent / "lorachat"
# As a user starts it: the console script where pip installed one; on a machine that runs lorachat from a checkout
# (the GPU check's), the module, which is what that script runs.
COMMAND = [str(LORACHAT)] if LORACHAT.exists() else [sys.executable, "-m", "lora_chat.cli"]
# Runs a command and prints its peak RSS (the largest resident set of its children: it has one).
MEASURED = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(code)")


def wrappers(folder: Path, side: str) -> list[Path]:
    """Each shipped recipe, writing under `folder/side/`: `extends` keeps every other key as shipped."""
    import yaml

    paths = []
    for name in RECIPES:
        path = folder / side / name
        path.parent.mkdir(parents=True, exist_ok=True)
        stem = name.removesuffix(".yaml")
        path.write_text(yaml.safe_dump({"name": yaml.safe_load((ROOT / "recipes" / name).read_text())["name"],
                                        "extends": str(ROOT / "recipes" / name),
                                        "output": {"dir": str(folder / side / "adapters" / stem)}}), encoding="utf-8")
        paths.append(path)
    return paths


def timed(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one `lorachat` command in its own process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED, *COMMAND, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"lorachat {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    rss = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return seconds, rss / 1024


def timing(folder: Path, sets: list[str], repeats: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"seq_s": [], "seq_rss": [], "joint_s": [], "joint_rss": []}
    for turn in range(repeats):
        seq = wrappers(folder, f"seq{turn}")
        runs = [timed(["finetune", str(r), *sets]) for r in seq]
        found["seq_s"].append(sum(s for s, _ in runs))
        found["seq_rss"].append(max(m for _, m in runs))
        joint = wrappers(folder, f"joint{turn}")
        seconds, rss = timed(["finetune", *map(str, joint), *sets])
        found["joint_s"].append(seconds)
        found["joint_rss"].append(rss)
    return found


# ---------------------------------------------------------------- the same weights (in-process worker)


def equality_worker(folder: Path, dtype: str, sets: list[str]) -> None:
    """Train the four alone and jointly in this process with the batch-invariant kernels; print the largest
    |weight difference|."""
    from safetensors.torch import load_file

    import lora_chat.train.joint.layer as joint_layer
    import lora_chat.train.run as single
    from lora_chat.recipe import load_recipe
    from lora_chat.runtime.invariant import tiles, use_invariant_kernels
    from lora_chat.train import Options, finetune
    from lora_chat.train.joint import finetune_joint

    # The kernels are the runtime's; training has no switch for them, so they are put on the model both paths
    # build: the single run's (build_model) and the joint run's once every adapter is attached.
    build, mixed = single.build_model, joint_layer.use_mixed_forward

    def invariant_build(*args, **kwargs):
        model = build(*args, **kwargs)
        use_invariant_kernels(model)
        return model

    def invariant_mixed(model, names):
        mixed(model, names)
        use_invariant_kernels(model)

    single.build_model, joint_layer.use_mixed_forward = invariant_build, invariant_mixed
    sets = [*sets, f"base.dtype={dtype}"]
    with tiles(prefill=True):
        alone = [load_recipe(r, sets) for r in wrappers(folder, f"alone-{dtype}")]
        for loaded in alone:
            finetune(loaded, Options())
        joint = [load_recipe(r, sets) for r in wrappers(folder, f"together-{dtype}")]
        finetune_joint(joint, Options())
    worst = 0.0
    for a, b in zip(alone, joint):
        wa = load_file(str(Path(a.recipe.output.dir) / "adapter_model.safetensors"))
        wb = load_file(str(Path(b.recipe.output.dir) / "adapter_model.safetensors"))
        worst = max(worst, max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa))
    print("MAX_DIFF", worst, flush=True)


def weight_difference(folder: Path, dtype: str, sets: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--equality", str(folder), dtype, *sets], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"equality ({dtype}) failed: {done.stderr.strip().splitlines()[-3:]}")
    return float(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("MAX_DIFF")))


# ---------------------------------------------------------------- the same eval report


def eval_report(adapters: list[Path], out: Path, samples: int) -> dict:
    timed(["eval", *map(str, adapters), "--max-samples", str(samples), "--max-new-tokens", "16", "--out", str(out)])
    return json.loads((out / "report.json").read_text())


def intervals(row: dict, prefix: str = "") -> dict[str, dict]:
    """Every {value, ci95: [low, high]} figure of a report row, by dotted name."""
    found = {}
    for key, value in row.items():
        if isinstance(value, dict) and {"value", "ci95"} <= value.keys():
            found[prefix + key] = value
        elif isinstance(value, dict):
            found.update(intervals(value, f"{prefix}{key}."))
    return found


def same_report(joint: dict, alone: dict) -> tuple[int, int]:
    """(figures of the joint adapters inside the alone adapters' 95% intervals, figures compared)."""
    inside = total = 0
    by_name = {row["name"]: row for row in alone["models"]}
    for row in joint["models"]:
        if "path" not in row:  # the base
            continue
        theirs = intervals(by_name[row["name"]])
        for name, figure in intervals(row).items():
            low, high = theirs[name]["ci95"] if name in theirs else (None, None)
            if figure["value"] is not None and low is not None:
                total += 1
                inside += low - 1e-9 <= figure["value"] <= high + 1e-9
    return inside, total


# The weight comparison trains each adapter twice per dtype in one process: a few short rows keep it to minutes
# (the same rows and steps on both sides is what matters, not how many).
EQUALITY_SETS = ["training.max_steps=2", "training.grad_accum=1", "data.max_length=128", "data.eval.split=0"]


def results(quick: bool) -> list[dict]:
    steps, accum, repeats = (2, 1, 1) if quick else (4, 2, 2)
    sets = ["--set", f"training.max_steps={steps}", "--set", f"training.grad_accum={accum}"]
    with tempfile.TemporaryDirectory(prefix="bench-joint-") as tmp:
        folder = Path(tmp)
        found = timing(folder, sets, repeats)
        seq_s, joint_s = statistics.median(found["seq_s"]), statistics.median(found["joint_s"])
        seq_rss, joint_rss = statistics.median(found["seq_rss"]), statistics.median(found["joint_rss"])
        fp32 = weight_difference(folder, "float32", EQUALITY_SETS)
        bf16 = weight_difference(folder, "bfloat16", EQUALITY_SETS)
        names = [r.removesuffix(".yaml") for r in RECIPES]
        samples = 8 if quick else 32
        joint_report = eval_report([folder / "joint0" / "adapters" / n for n in names], folder / "eval-joint", samples)
        alone_report = eval_report([folder / "seq0" / "adapters" / n for n in names], folder / "eval-seq", samples)
        inside, compared = same_report(joint_report, alone_report)
    how = f"4 adapters x {steps} steps (grad_accum {accum}), {repeats} turn(s) a side"
    return [
        {"name": "joint_train_wall_time (4 adapters)", "value": round(joint_s, 1), "unit": "s",
         "baseline": f"4 x lorachat finetune, one after another; {how}", "baseline_value": round(seq_s, 1),
         "ratio": round(joint_s / seq_s, 2), "goal": "<= 0.6"},
        {"name": "joint_train_peak_rss (4 adapters)", "value": round(joint_rss), "unit": "MB",
         "baseline": "one lorachat finetune (the largest of the four)", "baseline_value": round(seq_rss),
         "ratio": round(joint_rss / seq_rss, 2), "goal": "<= 1.25"},
        {"name": "joint_vs_alone_max_weight_diff (float32, batch-invariant kernels)", "value": fp32, "unit": "abs",
         "baseline": "each adapter trained alone, same seeds and rows", "baseline_value": None, "ratio": None,
         "goal": "<= 1e-5 abs"},
        {"name": "joint_vs_alone_max_weight_diff (bfloat16, batch-invariant kernels)", "value": bf16, "unit": "abs",
         "baseline": "each adapter trained alone, same seeds and rows", "baseline_value": None, "ratio": None,
         "goal": None},
        {"name": "joint_eval_figures_inside_alone_intervals", "value": inside, "unit": f"of {compared}",
         "baseline": f"lorachat eval of the 4 alone adapters vs base, {samples} samples each, 95% intervals",
         "baseline_value": compared, "ratio": round(inside / max(compared, 1), 2), "goal": "= 1"},
    ]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--equality":
        sys.path.insert(0, str(ROOT))
        equality_worker(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps of 1 row per adapter, one turn a side.")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    for row in results(args.quick):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
