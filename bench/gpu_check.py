"""The GPU check (issue 19): lorachat's training on a CUDA card, beside what `lorachat plan` said it would take.

    bash scripts/gpu-check.sh                      # on a lent GPU machine; figures into $OUT
    GPU_CHECK_ON_CPU=1 bash scripts/gpu-check.sh   # the same steps on this CPU, small: checks the script itself

scripts/gpu-check.sh prints the machine, installs carried wheels, runs `pytest -m gpu`, then this file, which:

1. builds SmolLM2-135M-Instruct's architecture with random weights from recipes/models/smollm2-135m (its
   config.json and tokenizer: the bundled weights are too large to travel, and memory does not depend on what
   the weights are);
2. runs `lorachat finetune` on it, each run in a process of its own (so its peak memory is its own): the
   quickstart recipe's data, micro-batch and LoRA (recipes/quickstart.yaml: one packed row of 512 tokens, 8 per
   step, r=16 on all linears) for a few dozen steps, as QLoRA and LoRA, with gradient checkpointing on and
   offloaded, with `training.kernels: liger` and with `base.attn_implementation: flash_attention_2`; a run whose
   package or device is missing is skipped, saying why;
3. sets each run's loss and metrics.json's `peak_memory` (torch.cuda.max_memory_reserved and
   max_memory_allocated; on a CPU the peak RSS) beside `lorachat plan --json` for the same recipe on this card:
   `reserved_gib` (the estimate less the CUDA context, which max_memory_reserved does not count);
4. writes gpu-check.json and gpu-check.md (a table to paste into bench/RESULTS.md) into --out.

On a CPU the plan is still a GPU's (the smallest card that fits), and the peak RSS counts Python, the libraries and
glibc's heap besides the tensors: those rows check the script, not the estimate (bench/bench_plan.py does that).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MODEL_FILES = ROOT / "recipes" / "models" / "smollm2-135m"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
GIB = 2**30
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers", "huggingface_hub",
            "bitsandbytes", "liger-kernel", "flash-attn", "triton", "pydantic", "zaragoza-construction-faq")
# name, --set style overrides of the quickstart recipe, what it needs besides lorachat's own dependencies
# (the runs are in order of need: those after the check's time budget are skipped)
RUNS = [
    ("qlora", {"base.quantization": "4bit"}, ()),
    ("lora", {}, ()),
    ("lora, liger", {"training.kernels": "liger"}, ("cuda", "liger_kernel")),
    ("lora, flash_attention_2", {"base.attn_implementation": "flash_attention_2"}, ("cuda", "flash_attn")),
    ("lora, checkpointing", {"training.gradient_checkpointing": True}, ()),
    ("lora, checkpointing offloaded", {"training.gradient_checkpointing": "offload"}, ()),
]
MISSING = {
    "cuda": "needs CUDA (lorachat refuses it on a CPU)",
    "liger_kernel": "liger-kernel is not installed (carry its wheel in .whl: scripts/gpu-wheels.sh)",
    "flash_attn": "flash-attn is not installed (PyPI has no wheel of it, only a source build that takes far "
                  "longer than this check)",
}
RUN_TIMEOUT_S = 120  # one finetune; a few dozen steps of a 135M model take seconds on a GPU
# Issue 20 on a GPU: bench/bench_joint.py's four adapters in one joint run against the four runs one after another,
# on the random base, as (optimizer steps, grad_accum) per adapter: the CPU benchmark's setting. On the H200 of
# 2026-12-04 the five processes took 223 s (each ~40 s to start and load), so a longer setting does not fit a call.
JOINT_SETTINGS = [(4, 2)]


def machine(cuda: bool) -> dict:
    import torch

    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    info = {"python": platform.python_version(), "torch_cuda": torch.version.cuda, "packages": found,
            "device": "cpu", "cpu_threads": torch.get_num_threads()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, device_memory_gib=round(props.total_memory / GIB, 1),
                    capability=f"{props.major}.{props.minor}")
    return info


def random_base(folder: Path, layers: int | None) -> Path:
    """recipes/models/smollm2-135m with random bf16 weights (seeded), optionally with fewer layers (CPU mode)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(MODEL_FILES, folder)
    config = AutoConfig.from_pretrained(str(folder))
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(folder))
    return folder


def write_recipe(path: Path, base: Path, overrides: dict, steps: int, cpu: bool) -> Path:
    recipe = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    recipe["name"] = path.stem
    recipe["base"]["model"] = str(base)
    recipe["training"].update(max_steps=steps, save_every=None, log_every=min(5, steps))
    recipe["output"]["dir"] = str(path.parent / "adapters" / path.stem)
    if cpu:  # a few small steps: this checks the script, not the figures
        recipe["data"]["max_length"] = 128
        recipe["training"]["grad_accum"] = 1
    for key, value in overrides.items():
        section, field = key.split(".")
        recipe[section][field] = value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def lorachat(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "lora_chat.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def plan_of(recipe: Path, gpu: str | None) -> dict:
    """`lorachat plan RECIPE --gpu GPU --json`'s figures (no GPU named, or one plan does not know: the smallest card
    that fits)."""
    from lora_chat.errors import LorachatError
    from lora_chat.plan import make_plan
    from lora_chat.plan.gpus import find_gpu

    try:
        card = find_gpu(gpu).name if gpu else None
    except LorachatError:
        card = None
    try:
        plan = make_plan(recipe, gpu=card).to_json()
    except LorachatError as err:
        return {"error": str(err)}
    return {key: plan[key] for key in ("gpu", "peak_memory_gib", "reserved_gib", "tokens_per_s",
                                       "gradient_checkpointing", "breakdown")}


def run_one(name: str, recipe: Path, log) -> dict:
    started = time.monotonic()
    try:
        proc = lorachat("finetune", str(recipe), "--overwrite", timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        said = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x for x in (err.stdout, err.stderr) if x)
        log.write(f"\n===== {name}: timed out after {RUN_TIMEOUT_S} s\n{said}")
        return {"status": "failed", "reason": f"timed out after {RUN_TIMEOUT_S} s"}
    log.write(f"\n===== {name} (exit {proc.returncode}, {time.monotonic() - started:.0f} s)\n"
              f"{proc.stdout}{proc.stderr}")
    if proc.returncode:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"status": "failed", "reason": f"exit {proc.returncode}: {last[0]}"}
    recipe_dict = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    metrics = json.loads((Path(recipe_dict["output"]["dir"]) / "metrics.json").read_text(encoding="utf-8"))
    train = metrics["train"]
    return {"status": "ok", "loss": train["loss"], "eval_loss": metrics.get("eval", {}).get("loss"),
            "steps": train["steps"], "tokens": train["tokens"], "runtime_s": train["runtime_s"],
            "tokens_per_s": round(train["tokens"] / max(train["runtime_s"], 1e-9), 1),
            "gradient_checkpointing": train["gradient_checkpointing"], "peak_memory": train.get("peak_memory"),
            "wall_s": round(time.monotonic() - started, 1)}


def compare(result: dict, plan: dict) -> None:
    """The measured peak in GiB and the estimate's error (estimate / measured - 1), as docs/plan.md counts it."""
    peak = result.get("peak_memory") or {}
    if peak.get("device") == "cuda":
        result["reserved_gib"] = round(peak["max_reserved_bytes"] / GIB, 3)
        result["allocated_gib"] = round(peak["max_allocated_bytes"] / GIB, 3)
        if "reserved_gib" in plan:
            result["plan_error"] = round(plan["reserved_gib"] / result["reserved_gib"] - 1, 3)
    elif peak.get("device") == "cpu":
        result["peak_rss_gib"] = round(peak["peak_rss_bytes"] / GIB, 3)


def joint_timing(work: Path, base: Path, cpu: bool) -> list[dict]:
    """bench_joint's timing (one turn a side) per setting; a failed side is recorded, not raised."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_joint

    found = []
    for steps, accum in [(1, 1)] if cpu else JOINT_SETTINGS:
        sets = ["--set", f"base.model={base}", "--set", f"training.max_steps={steps}",
                "--set", f"training.grad_accum={accum}", *(["--set", "data.max_length=128"] if cpu else [])]
        row = {"steps": steps, "grad_accum": accum, "adapters": len(bench_joint.RECIPES)}
        try:
            t = bench_joint.timing(work / f"joint-{steps}x{accum}", sets, repeats=1)
        except RuntimeError as err:
            row.update(status="failed", reason=str(err))
        else:
            row.update(status="ok", seq_s=round(t["seq_s"][0], 1), joint_s=round(t["joint_s"][0], 1),
                       ratio=round(t["joint_s"][0] / t["seq_s"][0], 2), seq_rss_mb=round(t["seq_rss"][0]),
                       joint_rss_mb=round(t["joint_rss"][0]), rss_ratio=round(t["joint_rss"][0] / t["seq_rss"][0], 2))
        print(f"joint {json.dumps(row)}", flush=True)
        found.append(row)
    return found


def pytest_summary(log: Path | None, rc: int | None) -> dict | None:
    if log is None or not log.is_file():
        return None
    lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return {"exit": rc, "summary": lines[-1].strip("= ") if lines else ""}


def markdown(report: dict) -> str:
    m = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    memory = f", {m['device_memory_gib']} GiB" if "device_memory_gib" in m else ""
    how = "GPU_CHECK_ON_CPU=1 bash scripts/gpu-check.sh" if report["mode"] == "cpu" else "bash scripts/gpu-check.sh"
    lines = [f"GPU check ({report['mode']}), {report['date']}: {m['device']}{memory}; Python {m['python']}, "
             f"CUDA {m['torch_cuda']}; {versions}. `{how}`: {report['steps']} steps a run, {report['micro_batch']}; "
             f"base: SmolLM2-135M's architecture, random weights.", ""]
    if report.get("pytest"):
        lines += [f"`pytest -m gpu`: {report['pytest']['summary']} (exit {report['pytest']['exit']})", ""]
    cuda = report["mode"] == "cuda"
    head = (["run", "loss", "eval loss", "tok/s", "max reserved GiB", "max allocated GiB", "plan reserved GiB",
             "plan error", "checkpointing"] if cuda else
            ["run", "loss", "eval loss", "tok/s", "peak RSS GiB", "plan (a GPU's) total GiB", "checkpointing"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["runs"]:
        plan = r.get("plan", {})
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r['reason']} |" + " |" * (len(head) - 2))
            continue
        common = [r["name"], f"{r['loss']:.4f}" if r["loss"] is not None else "-",
                  f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-", f"{r['tokens_per_s']:,.0f}"]
        ckpt = "on" if r["gradient_checkpointing"] else "off"
        if cuda:
            error = f"{100 * r['plan_error']:+.1f}%" if "plan_error" in r else "-"
            cells = common + [f"{r.get('reserved_gib', 0):.3f}", f"{r.get('allocated_gib', 0):.3f}",
                              f"{plan.get('reserved_gib', '-')}", error, ckpt]
        else:
            cells = common + [f"{r.get('peak_rss_gib', 0):.3f}", f"{plan.get('peak_memory_gib', '-')}", ckpt]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("joint"):
        lines += ["", "Joint training (issue 20): `lorachat finetune` of bench_joint.py's four recipes in one run "
                      "against four runs one after another, each a process as a user starts it (wall time with "
                      "startups and the end-of-run eval; peak RSS of the largest process).", "",
                  "| steps x grad_accum per adapter | 4 runs, s | joint, s | ratio (goal <= 0.6) "
                  "| peak RSS, joint / one |",
                  "|---|---|---|---|---|"]
        for j in report["joint"]:
            if j["status"] != "ok":
                lines.append(f"| {j['steps']} x {j['grad_accum']} | failed: {j['reason']} | | | |")
                continue
            lines.append(f"| {j['steps']} x {j['grad_accum']} | {j['seq_s']} | {j['joint_s']} | {j['ratio']} | "
                         f"{j['joint_rss_mb']} / {j['seq_rss_mb']} MB ({j['rss_ratio']}x) |")
    if not cuda:
        lines += ["", "CPU mode checks the script: the peak RSS counts Python, the libraries and glibc's heap, and "
                      "the plan is a GPU's, so the two columns are not comparable."]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> str:
    """gpu-check.json and gpu-check.md, rewritten after each run: a check stopped at its limit keeps its figures."""
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    (out / "gpu-check.md").write_text(table, encoding="utf-8")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU, small (checks the script)")
    parser.add_argument("--steps", type=int, help="optimizer steps a run (default: 30 on CUDA, 2 on a CPU)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="runs not started this many seconds after the start are skipped")
    parser.add_argument("--no-joint", action="store_true", help="skip the joint-training timing (issue 20)")
    parser.add_argument("--pytest-log", type=Path)
    parser.add_argument("--pytest-rc", type=int)
    args = parser.parse_args()

    import torch

    started = time.monotonic()
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("error: no CUDA device here; GPU_CHECK_ON_CPU=1 runs the check on the CPU", file=sys.stderr)
        return 2
    steps = args.steps or (30 if cuda else 2)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    info = machine(cuda)
    print(f"machine: {json.dumps(info)}", flush=True)
    base = random_base(work / "smollm2-135m-random", layers=None if cuda else 2)
    print(f"base: {base} (random weights{'' if cuda else ', 2 layers on the CPU'})", flush=True)
    gpu = info["device"] if cuda else None
    micro_batch = "1 packed row of 512 tokens, 8 per step" if cuda else "1 packed row of 128 tokens, 1 per step"
    report = {"mode": "cuda" if cuda else "cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": info, "steps": steps, "micro_batch": micro_batch,
              "pytest": pytest_summary(args.pytest_log, args.pytest_rc), "runs": [], "wall_s": None}
    report["joint"] = [] if args.no_joint else joint_timing(work, base, cpu=not cuda)
    write_report(args.out, report)

    with open(args.out / "finetune.log", "w", encoding="utf-8") as log:
        for name, overrides, needs in RUNS:
            missing = [MISSING[n] for n in needs if (n == "cuda" and not cuda)
                       or (n != "cuda" and importlib.util.find_spec(n) is None)]
            result = {"name": name, "settings": overrides}
            if missing:
                result.update(status="skipped", reason=missing[0])
            elif time.monotonic() - started > args.budget_s:
                result.update(status="skipped", reason=f"not started: over the check's {args.budget_s:.0f} s budget")
            else:
                recipe = write_recipe(work / f"{name.replace(', ', '-').replace(' ', '-')}.yaml", base, overrides,
                                      steps, cpu=not cuda)
                result["plan"] = plan_of(recipe, gpu)
                result.update(run_one(name, recipe, log))
                compare(result, result["plan"])
            log.flush()
            report["runs"].append(result)
            report["wall_s"] = round(time.monotonic() - started, 1)
            write_report(args.out, report)
            print(f"run {json.dumps({k: v for k, v in result.items() if k not in ('plan', 'settings')})}", flush=True)

    print(write_report(args.out, report), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["status"] == "failed" for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
