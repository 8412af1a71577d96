"""lorachat's chunked cross-entropy (train/loss.py) against the plain one, on SmolLM2-135M's head shape.

    HF_HUB_OFFLINE=1 python bench/bench_loss.py [--quick]

The plain side is what lorachat did before and what TRL/transformers do at trained positions: project the K
trained hidden states onto the vocabulary (K x 49152 logits), fp32 `F.cross_entropy`, autograd backward.
lorachat's side projects a chunk of rows at a time (plan.memory.loss_chunk_rows: 128 at this vocabulary),
computing the hidden states' gradient in the same pass.
Forward + backward of the loss alone on the same inputs: the two sides' timings alternate in one process (a
machine whose load drifts slows both alike), median of repeats after a warm-up; each side's peak RSS in its own
process. K = 2 x 512 x 0.6: two packed quickstart rows with 60% of positions trained.

The memory rows are repeated for the two vocabularies of the 7-8B models people train, at their hidden size 4096
and the torchtune job's micro-batch (2 x 2048 tokens, 60% trained): Llama 2's 32k (goal <= 0.25x the plain
path's added peak) and Llama 3's 128k (goal <= 0.1x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB, HIDDEN, ROWS = 49152, 576, 614
LARGE = {"32k": (32000, 4096, 2458), "128k": (128256, 4096, 2458)}  # vocabulary, hidden, trained rows


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(side: str, repeats: int, shape: str = "") -> dict:
    """side "plain" or "chunked": that side's added peak RSS; "time": both sides' median seconds, alternating."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from lora_chat.models import pick_dtype
    from lora_chat.train.loss import chunked_cross_entropy

    torch.manual_seed(0)
    dtype = pick_dtype("auto")
    vocab, width, rows = LARGE[shape] if shape else (VOCAB, HIDDEN, ROWS)
    weight = torch.randn(vocab, width, dtype=dtype) * 0.02
    hidden = torch.randn(rows, width, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))

    def step(which: str) -> None:
        if which == "plain":
            loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        else:
            loss = chunked_cross_entropy(hidden, weight, targets)
        loss.backward()
        hidden.grad = None

    if side != "time":
        step(side)  # warm-up
        before = _rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        step(side)
        return {"added_mb": (_rss("VmHWM") - before) / 2**20}
    times: dict[str, list[float]] = {"plain": [], "chunked": []}
    for i in range(repeats + 1):
        for which in ("plain", "chunked"):
            start = time.perf_counter()
            step(which)
            if i:  # round 0 is the warm-up
                times[which].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _run(side: str, repeats: int, shape: str = "") -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", side, "--repeats", str(repeats), "--shape", shape],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"bench_loss {side} failed:\n{proc.stderr[-2000:]}")


def results(quick: bool) -> list[dict]:
    seconds = _run("time", 5 if quick else 15)
    plain, ours = _run("plain", 1)["added_mb"], _run("chunked", 1)["added_mb"]
    baseline = "full-vocabulary fp32 logits + F.cross_entropy"
    return [
        {"name": "loss_step_ms", "value": round(1000 * seconds["chunked"], 1), "unit": "ms fwd+bwd",
         "baseline": baseline, "baseline_value": round(1000 * seconds["plain"], 1),
         "ratio": round(seconds["plain"] / seconds["chunked"], 2), "goal": ">= 1.0"},
        {"name": "loss_peak_rss_mb", "value": round(ours, 1), "unit": "MB added", "baseline": baseline,
         "baseline_value": round(plain, 1), "ratio": round(ours / max(plain, 1e-9), 2), "goal": "<= 0.5"},
    ] + [_large(name, goal) for name, goal in (("32k", "<= 0.25"), ("128k", "<= 0.1"))]


def _large(name: str, goal: str) -> dict:
    plain, ours = _run("plain", 1, name)["added_mb"], _run("chunked", 1, name)["added_mb"]
    vocab, width, rows = LARGE[name]
    return {"name": f"loss_peak_rss_mb_{name}", "value": round(ours, 1), "unit": "MB added",
            "baseline": f"full-vocabulary fp32 logits + F.cross_entropy, V={vocab} h={width} K={rows}",
            "baseline_value": round(plain, 1), "ratio": round(ours / max(plain, 1e-9), 3), "goal": goal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=["plain", "chunked", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=["", *LARGE], default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.repeats, args.shape)), flush=True)
        return
    for row in results(args.quick):
        print(f"{row['name']}: {row['value']} {row['unit']} vs {row['baseline_value']} ({row['baseline']}); "
              f"ratio {row['ratio']}, goal {row['goal']}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
