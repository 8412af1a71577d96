"""The decode loop: a batch whose rows each name their own adapter (or the base), one forward per step.

    done = generate(rt, [Request("faq-sv", prompt_sv), Request("base", prompt_en, Sampling(temperature=0.7,
                                                                                           seed=1))])
    for delta in stream(rt, requests):      # token by token: Delta(row, text, finish_reason)
        ...

Each step runs ONE forward over every unfinished row; `adapter_names=` routes each row through its own
adapter's LoRA matrices and the base weights are shared. Every LoRA layer computes the whole mixed batch in
two matmuls over its adapters' stacked matrices (`gathered_lora`), not PEFT's loop over adapters. Rows
finish on their own (a stop id, a stop string, max_tokens, or a cancelled request) and leave the
batch, so the remaining steps get cheaper. Greedy replies are the same bits alone or batched when the
set is batch-invariant (the default; see `invariant` and docs/batch-invariance.md).

Why our own loop and not what the stack offers (read in transformers 5.23 / PEFT 0.21.2):
  - `PeftModel.generate(adapter_names=...)` does mixed-adapter batches, but one `generate` call has one
    set of sampling settings and stop strings for all rows, its streamers take batch size 1, and it
    reports no finish reason per row. Serve needs per-request temperature/top_p/seed/stop, a stream per
    row and `finish_reason`; eval needs replies that do not depend on the batch. Those are per-row
    decisions between forwards, which is exactly this loop; the forward itself is still PEFT's model (its
    LoRA layers with the gathered forward of `gathered_lora`).
  - transformers' continuous batching (`generate_batch`, `ContinuousBatchingManager`, what
    `transformers serve` runs) schedules requests over a paged cache, but a request cannot name an
    adapter (no `adapter_names` path through its model runner), and its paged attention kernels are
    not the batch-invariant ones.
  - `transformers serve` is a server of its own, one model per request, switching adapters by loading.
So: HF's model forward + DynamicCache + PEFT's adapter routing (gathered per layer), and a small loop around them that
samples each row with its own settings and seeded generator, detects stops and streams text deltas.

Thread safety: the whole batch runs under `rt.lock`; rows pick adapters per row, nothing global is
switched. Concurrent callers are served one batch after another; serve's batcher gathers concurrent
requests into one call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import LorachatError, Where

if TYPE_CHECKING:
    import torch

    from .adapter_set import AdapterSet

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"


@dataclass(frozen=True)
class Sampling:
    """How one row decodes. temperature 0 is greedy; `seed` makes sampling reproducible per row."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random stream
    stop: tuple[str, ...] = ()  # stop strings; the reply ends before the first one

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise LorachatError(f"max_tokens must be at least 1, not {self.max_tokens}", Where(field="max_tokens"))
        if self.temperature < 0:
            raise LorachatError(f"temperature must be >= 0, not {self.temperature}", Where(field="temperature"))
        if not 0 < self.top_p <= 1:
            raise LorachatError(f"top_p must be in (0, 1], not {self.top_p}", Where(field="top_p"))


@dataclass
class Request:
    """One row: which resident answers (`AdapterSet.names`), the rendered prompt (text with the template's
    special tokens, or token ids), how to decode, and an optional event that cancels it mid-way."""

    model: str
    prompt: str | list[int]
    sampling: Sampling = field(default_factory=Sampling)
    cancelled: threading.Event | None = None


@dataclass(frozen=True)
class Delta:
    """New text for one row; `finish_reason` is set on the row's last delta ("stop", "length", "cancelled")."""

    row: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0  # generated so far, the stop token included (for streamed `usage`)


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int  # generated tokens, the stop token included
    token_ids: list[int]


def generate(rt: AdapterSet, requests: Sequence[Request],
             on_delta: Callable[[Delta], None] | None = None) -> list[Completion]:
    """Run `requests` as one batch to the end; `on_delta` sees every piece of text as it is decoded."""
    texts = [""] * len(requests)
    reasons: list[str] = [""] * len(requests)
    rows: list[_Row] = []
    for delta in _decode(rt, requests, rows):
        texts[delta.row] += delta.text
        if delta.finish_reason:
            reasons[delta.row] = delta.finish_reason
        if on_delta is not None:
            on_delta(delta)
    return [Completion(texts[i], reasons[i], len(r.prompt), len(r.tokens), r.tokens) for i, r in enumerate(rows)]


def stream(rt: AdapterSet, requests: Sequence[Request]) -> Iterator[Delta]:
    """The deltas of `requests` as they are decoded. The set stays locked until the iterator is exhausted
    or closed: consume it promptly (a server hands deltas to per-request queues) and close it
    (`contextlib.closing`) when stopping early, in the thread that iterated it."""
    return _decode(rt, requests, [])


# ---------------------------------------------------------------- the loop


class _Row:
    """One request's decoding state: its tokens, the text already sent, its sampler."""

    def __init__(self, index: int, request: Request, prompt: list[int], stop_ids: tuple[int, ...]):
        import torch

        self.index, self.request, self.prompt, self.stop_ids = index, request, prompt, set(stop_ids)
        self.sampling = request.sampling
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.finish: str | None = None
        self.generator = None
        if self.sampling.temperature > 0:
            self.generator = torch.Generator()
            if self.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.sampling.seed)

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits (V,)."""
        import torch

        if self.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.sampling.temperature, dim=-1)  # (V,)
        if self.sampling.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest head whose mass reaches top_p (the token that crosses it included).
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= self.sampling.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def advance(self, token: int, tokenizer: Any) -> Delta | None:
        """Take `token`; return the text it completes (if any) and whether the row is done."""
        self.tokens.append(token)
        if token in self.stop_ids:
            return self._finish(STOP, self._text(tokenizer, self.tokens[:-1]))
        text = self._text(tokenizer, self.tokens)
        for stop in self.sampling.stop:
            # Only the tail can hold a stop string that just completed.
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                return self._finish(STOP, text[:at])
        if len(self.tokens) >= self.sampling.max_tokens:
            return self._finish(LENGTH, text)
        if self.request.cancelled is not None and self.request.cancelled.is_set():
            return self._finish(CANCELLED, text[:self.sent])
        if text.endswith("\ufffd"):  # a character split over tokens: wait for the rest
            return None
        ready = len(text) - _held_back(text, self.sampling.stop)
        if ready <= self.sent:
            return None
        delta = Delta(self.index, text[self.sent:ready], None, len(self.tokens))
        self.sent = ready
        return delta

    def _finish(self, reason: str, text: str) -> Delta:
        self.finish = reason
        delta = Delta(self.index, text[self.sent:], reason, len(self.tokens))
        self.sent = len(text)
        return delta

    @staticmethod
    def _text(tokenizer: Any, tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could be the start of a stop string (not sent until decided)."""
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if stop.startswith(text[-k:])), default=0)


def _decode(rt: AdapterSet, requests: Sequence[Request], rows: list[_Row]) -> Iterator[Delta]:
    """Prefill every row in one left-padded forward, then one forward per step over the unfinished rows."""
    import torch
    from transformers import DynamicCache

    tokenizer = rt.tokenizer
    limit = rt.context_length
    for i, request in enumerate(requests):
        resident = rt.get(request.model)
        prompt = request.prompt if isinstance(request.prompt, list) else \
            tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        if not prompt:
            raise LorachatError("empty prompt", Where(field=f"requests[{i}].prompt"))
        if limit is not None and len(prompt) >= limit:
            raise LorachatError(f"the prompt is {len(prompt)} tokens; the model's context is {limit}",
                                Where(field=f"requests[{i}].prompt"))
        rows.append(_Row(i, request, prompt, resident.stop_ids))
    if not rows:
        return

    # The lock spans the whole batch (yields included); inference mode only the tensor work, so the
    # consumer's code between deltas runs in whatever mode it chose.
    with rt.lock:
        model = rt.model
        device = next(model.parameters()).device
        routing = {"adapter_names": rt.peft_names([r.request.model for r in rows])} \
            if hasattr(model, "peft_config") else {}
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):
            ids[b, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[b, width - len(row.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row counts from its first real token
        cache = DynamicCache(config=model.config)
        active = list(rows)  # rows still decoding, in the cache's batch order
        with torch.inference_mode(), _kernels(rt, prefill=True):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                           logits_to_keep=1, **routing, **_invariant(rt, mask)).logits[:, -1, :].float()  # (B, V)
        while True:
            keep: list[int] = []
            deltas: list[Delta] = []
            with torch.inference_mode():
                for b, row in enumerate(active):
                    if limit is not None and len(row.prompt) + len(row.tokens) + 1 >= limit:
                        row.sampling = _capped(row.sampling, len(row.tokens) + 1)  # the context is full
                    delta = row.advance(row.pick(logits[b]), tokenizer)
                    if delta is not None:
                        deltas.append(delta)
                    if row.finish is None:
                        keep.append(b)
            yield from deltas  # before the next forward: a streamed token is not held back a step
            if not keep:
                return
            with torch.inference_mode():
                if len(keep) < len(active):
                    cache.batch_select_indices(torch.tensor(keep, device=device))
                    mask = mask[keep]
                    positions = positions[keep]
                    active = [active[b] for b in keep]
                    if routing:
                        routing = {"adapter_names": [routing["adapter_names"][b] for b in keep]}
                step = torch.tensor([[r.tokens[-1]] for r in active], device=device)  # (B', 1)
                mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype)], dim=1)  # (B', T + t)
                positions = positions[:, -1:] + 1  # (B', 1)
                with _kernels(rt, prefill=False):
                    logits = model(input_ids=step, attention_mask=mask.to(device),
                                   position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                                   logits_to_keep=1, **routing, **_invariant(rt, mask)).logits[:, -1, :].float()


def _invariant(rt: AdapterSet, mask: torch.Tensor) -> dict[str, list[int]]:
    """The per-row key counts that switch the batch-invariant attention on (see `invariant`)."""
    if not rt.batch_invariant:
        return {}
    from .invariant import ROW_LENGTHS

    return {ROW_LENGTHS: mask.sum(dim=-1).tolist()}


def _kernels(rt: AdapterSet, prefill: bool) -> contextlib.AbstractContextManager:
    """Fixed-tile linear layers around a forward, when the set is batch-invariant."""
    if not rt.batch_invariant:
        return contextlib.nullcontext()
    from .invariant import tiles

    return tiles(prefill)


def _capped(sampling: Sampling, max_tokens: int) -> Sampling:
    from dataclasses import replace

    return replace(sampling, max_tokens=min(sampling.max_tokens, max_tokens))
