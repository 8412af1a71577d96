"""How fast `validate` reads, renders, tokenizes and masks, against plain batched apply_chat_template.

    HF_HUB_OFFLINE=1 python bench/bench_validate.py [--rows 100000]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    args = parser.parse_args()

    from lora_chat.models import load_tokenizer, resolve_base
    from lora_chat.recipe import load_recipe
    from lora_chat.validate import validate

    rows = chatterbot_chats(args.rows)
    tmp = Path(tempfile.mkdtemp(prefix="bench-validate-"))
    with (tmp / "chats.jsonl").open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (tmp / "recipe.yaml").write_text(
        f"name: bench\nbase:\n  model: {args.model}\ndata:\n  train:\n    - path: chats.jsonl\n"
        f"  eval: {{split: 0.01}}\n  max_length: 512\n", encoding="utf-8")
    tokenizer = load_tokenizer(resolve_base(args.model, need_weights=False))
    turns = sum(len(r["messages"]) for r in rows) / len(rows)
    print(f"rows: {len(rows)} short chats ({turns:.1f} messages each), tokenizer: {args.model}")

    start = time.perf_counter()
    batch = 1000
    base_tokens = 0
    for i in range(0, len(rows), batch):
        out = tokenizer.apply_chat_template([r["messages"] for r in rows[i:i + batch]], tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        base_tokens += sum(len(x) for x in ids)
    base_s = time.perf_counter() - start

    start = time.perf_counter()
    result = validate(load_recipe(tmp / "recipe.yaml"))
    ours_s = time.perf_counter() - start
    ours_tokens = sum(st.tokens for st in result.prepared.stats.values())
    assert result.usable, [str(p) for p in result.problems[:3]]

    print(f"baseline apply_chat_template(tokenize=True): {len(rows) / base_s:,.0f} rows/s ({base_s:.1f} s, "
          f"{base_tokens:,} tokens)")
    print(f"lorachat validate (read+lint+split+masks+stats): {len(rows) / ours_s:,.0f} rows/s ({ours_s:.1f} s, "
          f"{ours_tokens:,} tokens)")
    print(f"ratio (lorachat / baseline rows/s): {base_s / ours_s:.2f}  (goal >= 0.5)")
    print(f"validate wall time for {len(rows):,} rows: {ours_s:.1f} s  (goal < 30 s for 100k)")
    sys.exit(0)


if __name__ == "__main__":
    main()
