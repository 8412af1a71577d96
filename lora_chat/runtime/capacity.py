"""How many rows the continuous scheduler decodes at once when the operator does not say (`serve --max-batch`).

Two things bound it, and the smaller wins:

  - Memory. A running row holds its KV cache, 2 x layers x KV heads x head size values a token, for up to
    `ROW_TOKENS` tokens (the cache is left-padded to the longest row, so every row pays for the longest one).
    The rows get at most `MEMORY_SHARE` of what is free once the model is loaded: RAM on a CPU, the card's
    free memory on a GPU. SmolLM2-135M: 23 KiB a token, 94 MiB a row at 4,096 tokens; Llama-3.1-8B: 128 KiB,
    512 MiB a row.
  - Throughput. On the 2-core CPU the benchmarks run on, a decode step over SmolLM2's mixed-adapter batch
    gave 61 tokens/s at 8 rows, 111 at 32 and 180 at 64 (one run each; the fixed-tile linear layers amortise
    each weight read over more rows). Every row also lengthens every step, so each stream's tokens come slower
    (~0.35 s a step at 64 rows there); more than `MOST_ROWS` was not measured and is left to `--max-batch`.
    vLLM's scheduler caps its running sequences the same way (`max_num_seqs`).

Serve's old default was 8 rows (its gather-then-run batcher): under load every request then queued behind
whole batches, which is what the continuous scheduler removes (bench/bench_continuous.py).
"""

from __future__ import annotations

from typing import Any

MOST_ROWS = 64  # the most rows measured (see above); an operator may ask for more with --max-batch
FEWEST_ROWS = 1
ROW_TOKENS = 4096  # a row's cache is sized for this many tokens, or the model's context if shorter
MEMORY_SHARE = 0.5  # of the memory free after loading: the rest is the forwards' activations and the process


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes the KV cache holds for one token of one row: keys and values, every layer. The sizes are read as
    `plan` reads them (`plan.memory.Shape`: a multimodal model's text_config, the other names of each key)."""
    from ..errors import Where
    from ..plan.memory import Shape

    shape = Shape.from_config(config.to_dict(), Where(field="config.json"))
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes


def free_memory(device: Any) -> int:
    """Bytes free on `device` now: the card's free memory on CUDA, else what the host can allocate (plan's
    reading: MemAvailable within the cgroup's limit)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    from ..plan.host import available_bytes

    return available_bytes()


def default_max_running(rt: Any) -> int:
    """Rows for `rt`'s scheduler: as many as `MEMORY_SHARE` of the free memory holds at `ROW_TOKENS` each, at most
    `MOST_ROWS`."""
    import torch

    # rt.dtype is what the layers compute in (a 4-bit base's too), and so what the cache holds.
    per_token = kv_bytes_per_token(rt.model.config, getattr(torch, rt.dtype).itemsize)
    tokens = min(ROW_TOKENS, rt.context_length or ROW_TOKENS)
    rows = int(MEMORY_SHARE * free_memory(next(rt.model.parameters()).device)) // (per_token * tokens)
    return max(FEWEST_ROWS, min(MOST_ROWS, rows))
