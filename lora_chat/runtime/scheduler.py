"""Continuous batching: an iteration-level scheduler over the runtime, for serve.

    scheduler = Scheduler(rt, max_running=8, max_queue=256)
    scheduler.start()
    ticket = scheduler.submit(Request("faq-sv", prompt_ids), on_delta=print, on_done=print)   # any thread
    ...
    scheduler.stop()

One worker thread runs iterations. Each iteration (a) drops waiting requests whose callers left, (b) prefills
newcomers (a group of short prompts of up to `GROUP_CHUNKS` x `chunk_tokens` tokens, or the next `chunk_tokens`
of a long one), (c) runs ONE decode forward over every running row, whatever adapter each names, and (d) lets
finished rows leave. A request that arrives while others decode therefore gets its first token after at most
one prefill and one step, not after the whole batch (`generate`'s loop, which serve ran before, finishes a
batch before taking the next one).

Newcomers join in waves. A prefill forward costs about as much for one short prompt as for several: on a CPU
the fixed tiles and the per-forward overhead dominate (SmolLM2, measured: one 41-token prompt 0.50 s, eight
1.46 s). Under load a slot frees every other step, and prefilling each newcomer alone spent a forward per
request: while rows decode, newcomers wait until half the slots are free, or until the oldest has waited
`WAVE_STEPS` decode steps (so a lone newcomer is never held long).

Prefill: prompts of at most `chunk_tokens` tokens that start in the same iteration share one left-padded
forward (exactly `generate`'s prefill); a longer prompt is prefilled alone, `chunk_tokens` at a time, one chunk
per iteration, so decoding rows are never stalled by more than one chunk. A chunk's bounds depend only on its
own prompt, so a request is prefilled the same way alone or under load.

The KV cache (the design question): one `DynamicCache` for the running rows, left-padded to the longest row.
A newcomer is prefilled into a cache of its own, then joins by left-padding both to the wider one and
concatenating along the batch; rows that finish leave by `batch_select_indices`, and columns that have become
padding for every row are cut. This fits the batch-invariant kernels by construction: their attention reads
exactly a row's last n keys (`invariant.ROW_LENGTHS`), so how much padding lies to the left of a row, which
is all that joining and leaving change, never reaches its result, and the fixed-tile linear layers make a
row's bits independent of its neighbours. So a greedy reply is the same as the request alone (tested under
load). With the stock kernels (`batch_invariant=False`) the same masks and positions are correct, but a reply
may change with its neighbours, as in `generate`. Joining copies the running cache once (the concatenation);
`DynamicCache.update` copies it every step anyway, so this adds no new order of cost.

Why not transformers' own continuous batching (`generation/continuous_batching/`, read in 5.23): its
scheduler (`FIFOScheduler`, `PrefillFirstScheduler`) and paged cache are close to vLLM's design, which this
follows (iteration-level scheduling, a token budget per step, chunked prefill), but its batches flatten
every row's tokens into one ragged row with paged attention kernels, so a row's matmul tiles and attention
reductions move with its neighbours (not batch-invariant), and no request can name an adapter: its model
runner has no `adapter_names` path, which the mixed-adapter batches (`gathered_lora`) need. vLLM's scheduler adds
preemption and a block manager for a GPU's fixed memory; here a row's cache lives only while it runs and
`max_running` bounds them.

Admission: at most `max_queue` requests wait (beyond that `submit` raises `QueueFull`); at most
`max_running` rows decode at once (prefilling ones included). A caller cancels a request by setting its
`cancelled` event: waiting, it is dropped; running, its row ends at the next token ("cancelled").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .generate import CANCELLED, Completion, Delta, Request, _capped, _invariant, _kernels, _Row

if TYPE_CHECKING:
    import torch

    from .adapter_set import AdapterSet

log = logging.getLogger("lora_chat.runtime")

GROUP_CHUNKS = 4  # a group of short prompts may hold this many chunks' tokens: one forward for a whole wave
WAVE_STEPS = 4  # decode steps a newcomer may wait for others to join its prefill


class QueueFull(Exception):
    """More requests are waiting than the scheduler admits; `retry_after` is a hint in whole seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are already waiting; retry in {retry_after} s")
        self.waiting, self.retry_after = waiting, retry_after


class Aborted(Exception):
    """The scheduler ended a request before its reply was complete (shutdown)."""


@dataclass(eq=False)
class Ticket:
    """One submitted request: its callbacks (called on the worker thread) and when its tokens came."""

    request: Request
    on_delta: Callable[[Delta], None]
    on_done: Callable[[Completion | BaseException], None]
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None  # monotonic time of its first generated token
    finished: float | None = None

    def cancel(self) -> None:
        self.request.cancelled.set()


class _Slot:
    """A ticket with its decoding state: prompt tokens prefilled so far, text sent so far."""

    def __init__(self, ticket: Ticket, row: _Row):
        self.ticket, self.row = ticket, row
        self.text = ""
        self.prefilled = 0
        self.cache: Any = None  # its own cache while a long prompt is prefilled in chunks

    def emit(self, delta: Delta | None) -> None:
        if self.ticket.first_token is None:
            self.ticket.first_token = time.monotonic()
        if delta is None:
            return
        self.text += delta.text
        self.ticket.on_delta(delta)
        if delta.finish_reason:
            self.ticket.finished = time.monotonic()
            row = self.row
            self.ticket.on_done(Completion(self.text, delta.finish_reason, len(row.prompt), len(row.tokens),
                                           row.tokens))


class Scheduler:
    """Iteration-level batching of submitted requests (any mix of adapters) on one worker thread."""

    def __init__(self, rt: AdapterSet, *, max_running: int = 8, max_queue: int = 256, chunk_tokens: int = 128,
                 on_step: Callable[[int], None] | None = None):
        self.rt = rt
        self.max_running, self.max_queue, self.chunk_tokens = max_running, max_queue, chunk_tokens
        self.on_step = on_step  # called with the number of rows of every decode forward (metrics)
        self.finished: Counter[str] = Counter()  # finish reasons so far ("error" for failed rows)
        self.batch_sizes: Counter[int] = Counter()  # rows per decode forward -> forwards
        self._cv = threading.Condition()
        self._inbox: deque[Ticket] = deque()  # submitted, not yet seen by the worker
        self._waiting: deque[Ticket] = deque()
        self._chunking: _Slot | None = None  # the long prompt being prefilled
        self._running: list[_Slot] = []  # in the cache's batch order
        self._step_s = 0.0  # a decode step's duration, smoothed: how long a wave may keep newcomers waiting
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (B, T): 1 where a running row has a real key
        self._abort: str | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="lorachat-scheduler", daemon=True)

    # ------------------------------------------------------------ the caller's side (any thread)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    def submit(self, request: Request, on_delta: Callable[[Delta], None],
               on_done: Callable[[Completion | BaseException], None]) -> Ticket:
        """Queue `request`; raises `QueueFull` when `max_queue` requests already wait."""
        if request.cancelled is None:
            request.cancelled = threading.Event()
        ticket = Ticket(request, on_delta, on_done)
        with self._cv:
            waiting = len(self._inbox) + len(self._waiting)
            if waiting >= self.max_queue:
                # A queue this long empties at about max_running rows per reply; one second per such wave is a
                # coarse but monotone hint.
                raise QueueFull(waiting, max(1, waiting // max(1, self.max_running)))
            self._inbox.append(ticket)
            self._cv.notify()
        return ticket

    @property
    def waiting(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running) + (self._chunking is not None)

    def idle(self) -> bool:
        return not self.waiting and not self.running

    def abort(self, reason: str) -> None:
        """End every waiting and running request with `Aborted(reason)` at the next iteration (shutdown)."""
        with self._cv:
            self._abort = reason
            self._cv.notify()

    # ------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self._abort or self._stopping or self.running or self._waiting):
                    self._cv.wait()
                if self._stopping:
                    self._fail_all(Aborted("the scheduler stopped"))
                    return
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                abort, self._abort = self._abort, None
            if abort:
                self._fail_all(Aborted(abort))
                continue
            try:
                with self.rt.lock:
                    self._iterate()
            except Exception as err:  # noqa: BLE001 - every request in flight must hear of it; the worker goes on
                log.exception("a scheduler step failed")
                self._fail_all(err, waiting=False)

    def _fail_all(self, err: BaseException, *, waiting: bool = True) -> None:
        slots = [*self._running, *([self._chunking] if self._chunking else [])]
        tickets = [s.ticket for s in slots]
        if waiting:
            with self._cv:
                tickets += [*self._waiting, *self._inbox]
                self._waiting.clear()
                self._inbox.clear()
        self._running, self._chunking, self._cache, self._mask = [], None, None, None
        for ticket in tickets:
            self.finished["error"] += 1
            ticket.on_done(err)

    def _iterate(self) -> None:
        import torch

        with torch.inference_mode():
            self._drop_cancelled()
            self._prefill()
            if self._running:
                self._decode()

    def _drop_cancelled(self) -> None:
        gone = [t for t in self._waiting if t.request.cancelled.is_set()]
        for ticket in gone:
            self._waiting.remove(ticket)
            self.finished[CANCELLED] += 1
            ticket.on_done(Completion("", CANCELLED, 0, 0, []))

    def _slot(self, ticket: Ticket) -> _Slot:
        request = ticket.request
        prompt = request.prompt if isinstance(request.prompt, list) else \
            self.rt.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        return _Slot(ticket, _Row(0, request, prompt, self.rt.get(request.model).stop_ids))

    def _prefill(self) -> None:
        """Spend at most `chunk_tokens` prompt tokens: the next chunk of a long prompt, else a group of short ones."""
        if self._chunking is not None:
            self._prefill_chunk(self._chunking)
            return
        if self._running and not self._wave_ready():
            return
        group: list[_Slot] = []
        budget = GROUP_CHUNKS * self.chunk_tokens
        while self._waiting and len(self._running) + len(group) < self.max_running:
            ticket = self._waiting[0]
            try:
                slot = self._slot(ticket)
            except Exception as err:  # noqa: BLE001 - an adapter unloaded since the request was checked
                self._waiting.popleft()
                ticket.on_done(err)
                continue
            size = len(slot.row.prompt)
            if size > self.chunk_tokens:
                if not group:  # a long prompt starts alone; the short ones behind it wait one iteration
                    self._waiting.popleft()
                    self._chunking = slot
                    self._prefill_chunk(slot)
                break
            if size > budget:
                break
            self._waiting.popleft()
            group.append(slot)
            budget -= size
        if group:
            self._prefill_group(group)

    def _wave_ready(self) -> bool:
        free = self.max_running - len(self._running)
        if free <= 0 or not self._waiting:
            return False
        waited = time.monotonic() - self._waiting[0].submitted
        return free >= max(1, self.max_running // 2) or waited >= WAVE_STEPS * self._step_s

    def _prefill_group(self, group: list[_Slot]) -> None:
        """Short prompts in one left-padded forward (as `generate`'s prefill), then into the running batch."""
        import torch
        from transformers import DynamicCache

        model = self.rt.model
        width = max(len(s.row.prompt) for s in group)
        ids = torch.full((len(group), width), self.rt.tokenizer.pad_token_id, dtype=torch.long)  # (G, T)
        mask = torch.zeros((len(group), width), dtype=torch.long)  # (G, T)
        for b, slot in enumerate(group):
            ids[b, width - len(slot.row.prompt):] = torch.tensor(slot.row.prompt)
            mask[b, width - len(slot.row.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (G, T)
        cache = DynamicCache(config=model.config)
        logits = self._forward(ids, mask, positions, cache, [s.row.request.model for s in group], prefill=True)
        self._join(group, cache, mask, logits)

    def _prefill_chunk(self, slot: _Slot) -> None:
        """The next `chunk_tokens` of a long prompt, alone, into its own cache; the last chunk joins the batch."""
        import torch
        from transformers import DynamicCache

        if slot.row.request.cancelled.is_set():
            self._chunking = None
            self.finished[CANCELLED] += 1
            slot.emit(Delta(0, "", CANCELLED))
            return
        if slot.cache is None:
            slot.cache = DynamicCache(config=self.rt.model.config)
        start = slot.prefilled
        end = min(len(slot.row.prompt), start + self.chunk_tokens)
        ids = torch.tensor([slot.row.prompt[start:end]])  # (1, c)
        mask = torch.ones((1, end), dtype=torch.long)  # (1, cached + c)
        positions = torch.arange(start, end).unsqueeze(0)  # (1, c)
        logits = self._forward(ids, mask, positions, slot.cache, [slot.row.request.model], prefill=True)
        slot.prefilled = end
        if end == len(slot.row.prompt):
            self._chunking = None
            self._join([slot], slot.cache, mask, logits)
            slot.cache = None

    def _join(self, slots: list[_Slot], cache: Any, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Each newcomer's first token from its prefill logits; those not finished join the running cache."""
        import torch

        keep = [b for b, slot in enumerate(slots) if not self._advance(slot, logits[b])]
        if not keep:
            return
        if len(keep) < len(slots):
            cache.batch_select_indices(torch.tensor(keep))
            mask = mask[keep]
        joining = [slots[b] for b in keep]
        if self._cache is None:
            self._cache, self._mask, self._running = cache, mask, joining
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._running += joining

    def _decode(self) -> None:
        """One forward over every running row; finished rows leave, padding no row needs is cut."""
        import torch

        self.batch_sizes[len(self._running)] += 1
        if self.on_step is not None:
            self.on_step(len(self._running))
        started = time.monotonic()
        step = torch.tensor([[s.row.tokens[-1]] for s in self._running])  # (B, 1)
        positions = torch.tensor([[len(s.row.prompt) + len(s.row.tokens) - 1] for s in self._running])  # (B, 1)
        self._mask = torch.cat([self._mask, torch.ones((len(self._running), 1), dtype=self._mask.dtype)], dim=1)
        logits = self._forward(step, self._mask, positions, self._cache, [s.row.request.model for s in self._running],
                               prefill=False)
        took = time.monotonic() - started
        self._step_s = took if not self._step_s else 0.8 * self._step_s + 0.2 * took
        keep = [b for b, slot in enumerate(self._running) if not self._advance(slot, logits[b])]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        self._cache.batch_select_indices(torch.tensor(keep))
        self._mask = self._mask[keep]
        self._running = [self._running[b] for b in keep]
        unused = self._mask.shape[1] - int(self._mask.sum(dim=-1).max())  # left columns that are padding in every row
        if unused:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self._mask = self._mask[:, unused:]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 models: list[str], *, prefill: bool) -> torch.Tensor:
        """The model on (B, t) tokens -> the last position's logits (B, V), each row through its own adapter."""
        model = self.rt.model
        device = next(model.parameters()).device
        routing = {"adapter_names": self.rt.peft_names(models)} if hasattr(model, "peft_config") else {}
        with _kernels(self.rt, prefill=prefill):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                        past_key_values=cache, use_cache=True, logits_to_keep=1, **routing,
                        **_invariant(self.rt, mask))
        return out.logits[:, -1, :].float()

    def _advance(self, slot: _Slot, logits: torch.Tensor) -> bool:
        """Pick the slot's next token and send what it completes; True when the slot is done."""
        row = slot.row
        limit = self.rt.context_length
        if limit is not None and len(row.prompt) + len(row.tokens) + 1 >= limit:
            row.sampling = _capped(row.sampling, len(row.tokens) + 1)  # the context is full
        slot.emit(row.advance(row.pick(logits), self.rt.tokenizer))
        if row.finish is not None:
            self.finished[row.finish] += 1
        return row.finish is not None


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` (B, ..., T[, D]) with zeros on the left of its sequence axis up to `width` (dim 2 of a cache, 1 of a mask)."""
    import torch

    axis = 1 if x.dim() == 2 else 2
    pad = width - x.shape[axis]
    if pad <= 0:
        return x
    shape = list(x.shape)
    shape[axis] = pad
    return torch.cat([x.new_zeros(shape), x], dim=axis)
