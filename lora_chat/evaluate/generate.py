"""Eval's replies, generated on the runtime: every (model, prompt) pair is a row, rows of different
adapters share a batch, batches hold prompts of similar length (little padding).

With a batch-invariant runtime (the default) a greedy reply is the same whatever `batch_size`, the
order of the data and the other rows in its batch; with `--fast` it may differ in near-ties, and the
report says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..runtime import Request, Sampling, generate

if TYPE_CHECKING:
    from ..runtime import AdapterSet


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0  # for sampling: prompt i samples from seed + i under every model, so reruns match
    batch_size: int = 16


def generate_replies(rt: AdapterSet, jobs: list[tuple[str, int, str]], decoding: Decoding,
                     done: Callable[[int], None] = lambda n: None) -> list[str]:
    """Replies for `jobs` = (resident name, prompt index, rendered prompt), in input order.

    `done(n)` is called after each batch with the number of replies finished so far (progress).
    """
    lengths = [len(rt.tokenizer(prompt, add_special_tokens=False)["input_ids"]) for _, _, prompt in jobs]
    order = sorted(range(len(jobs)), key=lambda j: lengths[j])
    replies: dict[int, str] = {}
    for start in range(0, len(order), decoding.batch_size):
        rows = order[start:start + decoding.batch_size]
        requests = [Request(jobs[j][0], jobs[j][2], _sampling(decoding, jobs[j][1])) for j in rows]
        for j, completion in zip(rows, generate(rt, requests)):
            replies[j] = completion.text.strip()
        done(len(replies))
    return [replies[j] for j in range(len(jobs))]


def _sampling(decoding: Decoding, index: int) -> Sampling:
    seed = decoding.seed + index if decoding.temperature > 0 else None
    return Sampling(max_tokens=decoding.max_new_tokens, temperature=decoding.temperature, top_p=decoding.top_p,
                    seed=seed)
