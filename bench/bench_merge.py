"""Forward latency of a merged model against the same adapter left on its base (what `lorachat merge` buys).

    HF_HUB_OFFLINE=1 python bench/bench_merge.py [--quick]

Both sides run in this process on the real bundled SmolLM2-135M-Instruct (`resolve_base`), in the dtype
`auto` picks here, on the same batch: quickstart conversations rendered by the recipe's template, padded to one
length. The adapter is the quickstart's shape (r 16, alpha 32, all linear layers) with PEFT's random init of
both matrices (`init_lora_weights=False`), so no training run is needed and B is not zero; the merged side is
`merge_and_unload` of a copy of that very model, which is what `lorachat merge` writes. Each side gets a warm-up
pass, then the median of N timed forward passes, the two sides alternating. Goal: the merged model is faster (ratio adapter / merged > 1), since it
runs 7 matrix products per layer instead of 7 plus 14 thin LoRA ones.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


def results(quick: bool) -> list[dict]:
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_chat.inputs import load_inputs
    from lora_chat.recipe import load_recipe
    from lora_chat.models import load_model

    batch, repeats = (4, 5) if quick else (8, 10)
    inputs = load_inputs(load_recipe(RECIPE), need_weights=True)
    texts = [inputs.template.render(inputs.template.messages_of(c)) for c in inputs.data.train[:batch]]
    encoded = inputs.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    model = load_model(inputs.base, dtype="auto", for_training=False)
    torch.manual_seed(0)
    lora = inputs.loaded.recipe.lora
    peft = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules="all-linear",
                                            lora_dropout=0.0, init_lora_weights=False)).eval()

    merged = copy.deepcopy(peft).merge_and_unload()

    @torch.inference_mode()
    def seconds(net) -> float:
        start = time.perf_counter()
        net(**encoded)
        return time.perf_counter() - start

    seconds(peft), seconds(merged)  # warm-up: first-call allocations
    # Alternating the two sides spreads any change in the machine's load over both of them.
    pairs = [(seconds(peft), seconds(merged)) for _ in range(repeats)]
    adapter_ms, merged_ms = (statistics.median(side) * 1000 for side in zip(*pairs))
    shape = f"{tuple(encoded['input_ids'].shape)} {model.dtype}".replace("torch.", "")
    return [{"name": "merged_vs_adapter_latency", "value": round(merged_ms, 1), "unit": f"ms/forward {shape}",
             "baseline": "adapter on base (PEFT, unmerged)", "baseline_value": round(adapter_ms, 1),
             "ratio": round(adapter_ms / merged_ms, 2), "goal": ">= 1.0"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smaller batch, fewer timed passes.")
    args = parser.parse_args()
    rows = results(args.quick)
    keys = ["name", "value", "unit", "baseline", "baseline_value", "ratio", "goal"]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))


if __name__ == "__main__":
    main()
