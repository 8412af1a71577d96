"""How fast `eval` generates, against a naive one-prompt-at-a-time `generate` loop on the same model.

    HF_HUB_OFFLINE=1 python bench/bench_eval.py [--prompts 64] [--max-new-tokens 48] [--batch-size 16]

Both sides run in this process on the real bundled SmolLM2-135M-Instruct (`resolve_base`) and the
same prompts: conversations of the quickstart recipe's data (its eval split first, then training
rows), each cut before its last assistant reply by the recipe's template, exactly as `eval` asks.
Both decode greedily for the same number of new tokens and stop at the same end-of-turn tokens.
The naive side tokenizes one prompt and calls `model.generate` on it, prompt after prompt; eval's
side is `generate_batched` (length-sorted, left-padded batches, one `generate` per batch).
Goal: ratio >= 2 on 64 prompts on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import torch

    from lora_chat.evaluate.generate import Decoding, generate_batched, stop_ids
    from lora_chat.models import load_model
    from lora_chat.inputs import load_inputs
    from lora_chat.recipe import load_recipe

    inputs = load_inputs(load_recipe(RECIPE), need_weights=True)
    conversations = (inputs.data.eval + inputs.data.train)[: args.prompts]
    prompts = [inputs.template.prompt(c) for c in conversations]
    base = inputs.loaded.recipe.base
    model = load_model(inputs.base, dtype=base.dtype, for_training=False)
    tokenizer = inputs.tokenizer
    print(f"{len(prompts)} prompts, max_new_tokens={args.max_new_tokens}, dtype={model.dtype}, "
          f"threads={torch.get_num_threads()}, base={inputs.base.model_id} ({inputs.base.source})")

    @torch.inference_mode()
    def naive() -> list[str]:
        out = []
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
            generated = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(model, tokenizer))
            out.append(tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out

    def batched() -> list[str]:
        decoding = Decoding(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        return generate_batched(model, tokenizer, prompts, decoding)

    generate_batched(model, tokenizer, prompts[:2], Decoding(max_new_tokens=2))  # warm-up: first-call overheads
    timings = {}
    replies = {}
    for name, fn in (("naive loop", naive), ("eval batched", batched)):
        start = time.perf_counter()
        replies[name] = fn()
        timings[name] = time.perf_counter() - start
        print(f"{name:>13}: {timings[name]:7.2f} s  {len(prompts) / timings[name]:6.2f} samples/s")
    same = sum(a == b for a, b in zip(replies["naive loop"], replies["eval batched"]))
    print(f"identical replies: {same}/{len(prompts)} (padding changes float rounding, so a near-tie can flip)")
    print(f"ratio: {timings['naive loop'] / timings['eval batched']:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
