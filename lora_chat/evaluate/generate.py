"""Batched generation: left-padded prompts, one `generate` call per batch.

Left padding keeps every prompt's last token at the same position, so one forward per decoding
step serves the whole batch; prompts are sorted by length so a batch carries little padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0  # for sampling; each model restarts from it, so reruns match
    batch_size: int = 16


@torch.inference_mode()
def generate_batched(model: Any, tokenizer: Any, prompts: list[str], decoding: Decoding) -> list[str]:
    """Replies to `prompts` (rendered chat prompts, special tokens included), in input order."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    replies: dict[int, str] = {}
    sampling = decoding.temperature > 0
    if sampling:
        torch.manual_seed(decoding.seed)
    for start in range(0, len(order), decoding.batch_size):
        rows = order[start:start + decoding.batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T), left padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for row, i in enumerate(rows):
            n = len(encoded[i])
            ids[row, width - n:] = torch.tensor(encoded[i])
            mask[row, width - n:] = 1
        extra = {"temperature": decoding.temperature, "top_p": decoding.top_p} if sampling else {}
        output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                max_new_tokens=decoding.max_new_tokens, do_sample=sampling,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(model, tokenizer),
                                **extra)  # (B, T + new)
        for row, i in enumerate(rows):
            replies[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
    return [replies[i] for i in range(len(prompts))]


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus the model's own: chat models often end a turn with a token
    (`<|im_end|>`, `<|eot_id|>`) that only one of the two names."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)
