"""Preference pairs from real data: the FAQ's reference answer chosen, the base model's greedy reply rejected.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/faq_pairs.py                      # recipes/quickstart.yaml's data
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/faq_pairs.py --recipe recipes/quickstart-sv.yaml --out runs/pairs-sv

Writes OUT/train.jsonl and OUT/eval.jsonl in lorachat's preference format ({"messages": prompt turns, "chosen",
"rejected"}), split exactly as the recipe splits its data (its seeded eval split): the held-out pairs' prompts are
ones the recipe's SFT adapter never trained on either, so `lorachat eval --pairs OUT/eval.jsonl` compares the base,
that SFT adapter and a DPO adapter trained on OUT/train.jsonl (recipes/faq-dpo.yaml) on unseen prompts.
OUT defaults to runs/pairs, which git ignores: the FAQ's text is third-party (CC-BY-4.0) and is not committed.
A pair whose greedy reply equals the reference is left out (it would teach nothing) and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml", help="the SFT recipe whose data and split to use")
    parser.add_argument("--out", default="runs/pairs", help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest greedy reply of the base")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="at most N training pairs (the first N of the train split)")
    parser.add_argument("--fast", action="store_true", help="stock attention kernels: faster, and a greedy reply "
                                                            "may then depend on its batch (as eval --fast)")
    args = parser.parse_args(argv)

    from lora_chat.errors import LorachatError
    from lora_chat.evaluate.generate import Decoding, generate_replies
    from lora_chat.files import write_text_atomic
    from lora_chat.inputs import load_inputs
    from lora_chat.progress import Progress
    from lora_chat.recipe import load_recipe
    from lora_chat.runtime import BASE, AdapterSet

    console = Console(stderr=True)
    try:
        loaded = load_recipe(args.recipe)
        inputs = load_inputs(loaded)
        rt = AdapterSet.open(base=loaded.recipe.base.model, batch_invariant=not args.fast, say=lambda line: console.print(f"[dim]{line}[/]"))
    except LorachatError as err:
        console.print(f"error: {err}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    template, decoding = inputs.template, Decoding(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    for split, conversations in (("train", inputs.data.train[:args.limit]), ("eval", inputs.data.eval)):
        jobs = [(BASE, i, template.prompt(c)) for i, c in enumerate(conversations)]
        with Progress(console, f"base replies ({split})", len(jobs)) as progress:
            replies = generate_replies(rt, jobs, decoding, done=lambda n: progress.update(n))
        rows, same = [], 0
        for conversation, reply in zip(conversations, replies):
            messages = conversation.as_dicts()
            reference = messages[-1]["content"]
            if not reply.strip() or reply.strip() == reference.strip():
                same += 1
                continue
            rows.append({"messages": messages[:-1], "chosen": reference, "rejected": reply})
        path = out / f"{split}.jsonl"
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        console.print(f"{path}: {len(rows)} pairs ({same} left out: the base's reply was empty or the reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
