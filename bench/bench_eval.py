"""How fast `eval` generates against a naive one-prompt-at-a-time `generate` loop, and whether its replies
depend on the batch.

    HF_HUB_OFFLINE=1 python bench/bench_eval.py [--quick] [--prompts 32] [--max-new-tokens 32] [--batch-size 16]
        [--dtype bfloat16] [--fast]

Both sides run in this process on the real bundled SmolLM2-135M-Instruct, in the dtype the quickstart
recipe resolves to here (`auto`: bfloat16 on CPUs with native bf16, else float32), on the same prompts:
conversations of the quickstart recipe's data (its eval split first, then training rows), each cut
before its last assistant reply by the recipe's template, exactly as `eval` asks.
  - naive loop: tokenize one prompt, `model.generate` on it (stock kernels), prompt after prompt;
  - eval: `generate_replies` on the runtime as `eval` runs it by default (batch-invariant kernels,
    length-sorted batches of `--batch-size` rows).
Identical replies: eval's batched replies against the same prompts run through eval one at a time
(batch size 1), token for token; goal all of them. Speed goal: ratio >= 2 against the naive loop.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


def measure(prompts: int, max_new_tokens: int, batch_size: int, dtype: str | None = None, fast: bool = False) -> dict:
    import torch

    from lora_chat.evaluate.generate import Decoding, generate_replies
    from lora_chat.inputs import load_inputs
    from lora_chat.recipe import load_recipe
    from lora_chat.runtime import AdapterSet

    inputs = load_inputs(load_recipe(RECIPE))
    conversations = (inputs.data.eval + inputs.data.train)[:prompts]
    texts = [inputs.template.prompt(c) for c in conversations]
    rt = AdapterSet.open(base=inputs.loaded.recipe.base.model, dtype=dtype or inputs.loaded.recipe.base.dtype,
                         batch_invariant=not fast)
    model, tokenizer = rt.model, rt.tokenizer
    stops = list(rt.get("base").stop_ids)
    print(f"{len(texts)} prompts, max_new_tokens={max_new_tokens}, batch_size={batch_size}, dtype={rt.dtype}, "
          f"threads={torch.get_num_threads()}, base={rt.base.model_id} ({rt.base.source})", flush=True)

    @torch.inference_mode()
    def naive() -> list[str]:
        # Outside the runtime's decode loop the model runs its stock kernels: this is plain transformers.
        out = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
            out.append(tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out

    jobs = [("base", i, text) for i, text in enumerate(texts)]

    def batched() -> list[str]:
        return generate_replies(rt, jobs, Decoding(max_new_tokens=max_new_tokens, batch_size=batch_size))

    def alone() -> list[str]:
        return generate_replies(rt, jobs, Decoding(max_new_tokens=max_new_tokens, batch_size=1))

    generate_replies(rt, jobs[:2], Decoding(max_new_tokens=2))  # warm-up: first-call overheads
    timings, replies = {}, {}
    for name, fn in (("naive loop", naive), ("eval batched", batched), ("eval alone", alone)):
        start = time.perf_counter()
        replies[name] = fn()
        timings[name] = time.perf_counter() - start
        print(f"{name:>13}: {timings[name]:7.2f} s  {len(texts) / timings[name]:6.2f} samples/s", flush=True)
    return {"prompts": len(texts), "timings": timings, "dtype": rt.dtype,
            "identical": sum(a == b for a, b in zip(replies["eval batched"], replies["eval alone"])),
            "as_naive": sum(a == b for a, b in zip(replies["eval batched"], replies["naive loop"]))}


def results(quick: bool, prompts: int | None = None, max_new_tokens: int | None = None,
            batch_size: int = 16, dtype: str | None = None, fast: bool = False) -> list[dict]:
    run = measure(prompts or (16 if quick else 32), max_new_tokens or (16 if quick else 32), batch_size, dtype, fast)
    kernels = "stock kernels (--fast)" if fast else "batch-invariant"
    n, t = run["prompts"], run["timings"]
    return [
        {"name": f"eval generation speed ({run['dtype']}, {kernels})", "value": round(t["eval batched"], 2),
         "unit": "s", "baseline": "one-at-a-time generate loop", "baseline_value": round(t["naive loop"], 2),
         "ratio": round(t["naive loop"] / t["eval batched"], 2), "goal": ">= 2"},
        {"name": "eval identical replies, batched vs alone", "value": run["identical"], "unit": "replies",
         "baseline": "prompts", "baseline_value": n, "ratio": round(run["identical"] / n, 2), "goal": "= 1"},
        # Not a goal: the stock kernels round differently from the invariant ones, so near-ties may differ.
        {"name": "eval replies equal to the naive loop's", "value": run["as_naive"], "unit": "replies",
         "baseline": "prompts", "baseline_value": n, "ratio": round(run["as_naive"] / n, 2), "goal": "(info)"},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts of 16 tokens instead of 32 of 32.")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="Instead of the recipe's (auto).")
    parser.add_argument("--fast", action="store_true", help="The runtime's stock kernels, as `eval --fast`.")
    args = parser.parse_args()
    for r in results(args.quick, args.prompts, args.max_new_tokens, args.batch_size, args.dtype, args.fast):
        print(f"{r['name']:52s} {r['value']:>8} {r['unit']:7s} vs {r['baseline_value']:>8} ({r['baseline']}): "
              f"{r['ratio']:.2f}x (goal {r['goal']})")


if __name__ == "__main__":
    main()
