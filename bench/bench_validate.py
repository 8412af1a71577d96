"""How fast `validate` reads, renders, tokenizes and masks, against plain batched apply_chat_template.

    HF_HUB_OFFLINE=1 python bench/bench_validate.py [--quick]

Both sides run in this process on the same rows: short chats made from the chatterbot-corpus
English conversations (read from the installed package), numbered so no two rows are equal.
The baseline is `tokenizer.apply_chat_template(rows, tokenize=True)` in batches: rendering and
tokenizing only, no masks. lorachat's side is the whole `validate` (read the file, lint every
row, split, render spans, tokenize with offsets, mask, count per role). Goal: ratio >= 0.5,
and the whole validate under 30 s for 100k rows on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def chatterbot_chats(rows: int) -> list[dict]:
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    convs = []
    for f in sorted(folder.glob("*.yml")):
        for turns in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t) for t in turns if str(t).strip()]
            if len(turns) >= 2:
                convs.append(turns[: len(turns) // 2 * 2])
    out = []
    for i in range(rows):
        turns = convs[i % len(convs)]
        messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
        messages[0]["content"] = f"({i}) {messages[0]['content']}"
        out.append({"messages": messages})
    return out


def measure(rows_n: int, repeats: int, model: str = MODEL) -> dict:
    """Median seconds of each side over `repeats` runs after one warm-up of each, on the same rows."""
    import statistics

    from lora_chat.models import load_tokenizer, resolve_base
    from lora_chat.recipe import load_recipe
    from lora_chat.validate import validate

    rows = chatterbot_chats(rows_n)
    tmp = Path(tempfile.mkdtemp(prefix="bench-validate-"))
    with (tmp / "chats.jsonl").open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (tmp / "recipe.yaml").write_text(
        f"name: bench\nbase:\n  model: {model}\ndata:\n  train:\n    - path: chats.jsonl\n"
        f"  eval: {{split: 0.01}}\n  max_length: 512\n", encoding="utf-8")
    tokenizer = load_tokenizer(resolve_base(model, need_weights=False))

    def baseline() -> None:
        for i in range(0, len(rows), 1000):
            tokenizer.apply_chat_template([r["messages"] for r in rows[i:i + 1000]], tokenize=True)

    def ours() -> None:
        result = validate(load_recipe(tmp / "recipe.yaml"))
        assert result.usable, [str(p) for p in result.problems[:3]]

    times: dict[str, list[float]] = {"baseline": [], "ours": []}
    for i in range(repeats + 1):
        for name, fn in (("baseline", baseline), ("ours", ours)):
            start = time.perf_counter()
            fn()
            if i:  # the first round warms caches (tokenizer, template compilation) and is not counted
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()} | {"rows": len(rows)}


def results(quick: bool) -> list[dict]:
    m = measure(10_000 if quick else 100_000, repeats=3 if quick else 1)
    ours, base = m["rows"] / m["ours"], m["rows"] / m["baseline"]
    out = [{"name": "preprocess_rows_per_s", "value": round(ours), "unit": "rows/s",
            "baseline": "batched apply_chat_template(tokenize=True)", "baseline_value": round(base),
            "ratio": round(ours / base, 3), "goal": ">= 0.5"}]
    if not quick:
        out.append({"name": "validate_100k_seconds", "value": round(m["ours"], 1), "unit": "s",
                    "baseline": "goal", "baseline_value": 30, "ratio": None, "goal": "<= 30"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k rows, median of 3 (default: 100k rows, once).")
    args = parser.parse_args()
    for row in results(args.quick):
        print(f"{row['name']}: {row['value']} {row['unit']} (baseline {row['baseline']}: {row['baseline_value']}, "
              f"ratio {row['ratio']}, goal {row['goal']})")
    sys.exit(0)


if __name__ == "__main__":
    main()
