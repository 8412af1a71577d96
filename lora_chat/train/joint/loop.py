"""The joint training loop: every adapter's optimizer step s in one pass of mixed micro-batches over the shared base.

    step s:  rows of step s of every member still training (each member's own sampler order)
             -> sorted longest first, cut into micro-batches of the largest batch_size of the recipes
             -> each micro-batch: one forward and backward over the frozen base, row b's LoRA delta from its own
                adapter (layer.py); loss of member m = its rows' summed token loss / m's trained tokens in step s
             -> each member: clip its own gradient, its own optimizer and schedule step, its log, eval, checkpoint

Why the update of a member equals the one it gets alone: its loss term depends only on its own rows and
adapter, its gradient reaches only its own A and B (other rows' deltas come from other adapters' weights), and it
is divided by the same count the single run divides by (the step's trained tokens, trainer.py). Which rows share a
micro-batch then changes only the order of float sums, and with the batch-invariant kernels
(runtime/invariant.py) not even each row's forward; bench/bench_joint.py measures the difference.

Several processes (--processes N, accelerate launch, torchrun): every rank computes the same step rows (same
seeds), takes micro-batches rank, rank + N, ...; the adapters' gradients are summed across ranks in one
all-reduce (each rank divided by the step's global token count, so the sum is the update), and every rank steps
the same optimizers. Rank 0 writes logs, checkpoints and adapters.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from transformers import TrainerControl

from ...errors import RunFailed
from ...progress import Progress, bars
from ...templates import IGNORE
from .. import checkpoints, distributed
from ..callbacks import Interrupted, ShowProgress, Signals, _all_sum
from ..collate import Collator
from ..loss import TrainedPositions, chunked_cross_entropy
from ..trainer import NonFiniteLoss
from .layer import route
from .members import Member

BAD = {1.0: "nan", 2.0: "inf"}


class JointTrainer:
    def __init__(self, model: Any, members: Sequence[Member], collator: Collator, device: torch.device,
                 console: Console):
        self.model, self.members, self.collator, self.device, self.console = model, list(members), collator, device, console
        self.selector = TrainedPositions(model.get_output_embeddings())
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = self.rank == 0
        # The mixed micro-batch holds as many rows as the largest micro-batch of the recipes: the activation memory
        # of the largest single run, whatever the number of adapters (lorachat plan estimates the same).
        self.micro_rows = max(m.recipe.training.batch_size for m in members)
        self.signals = Signals()
        self.run_tokens, self.window_start = 0, time.perf_counter()

    # ------------------------------------------------------------ the loop

    def fit(self) -> float:
        """Train every member to its last step (or its NaN); return the seconds spent."""
        started = time.perf_counter()
        todo = [m for m in self.members if not m.finished]
        if not todo:
            return 0.0
        first, last = min(m.step for m in todo), max(m.total_steps for m in todo)
        bar = bars(self.console) if self.is_main and self.console.is_terminal else None
        shows = {m.name: ShowProgress(m.meter, self.console, m.recipe.training.log_every, label=m.label, bar=bar)
                 for m in self.members}
        total = Progress(self.console, "all adapters", total=last, start=first, bar=bar) if self.is_main else None
        if bar is not None:
            bar.start()
        for m in todo:
            shows[m.name].on_train_begin(m.args, m.state, TrainerControl())
        self.signals.install()
        try:
            for step in range(first, last):
                active = [m for m in self.members if not m.finished and m.step == step]
                if not active:
                    continue
                logged = self.train_step(step, active, shows)
                fields = self.run_fields()  # a collective: every rank
                if total is not None:
                    total.update(step + 1, fields, line=logged)
                if _all_sum([float(self.signals.received or 0)])[0] > 0:
                    self.interrupt(step)
        finally:
            self.signals.restore()
            for show in shows.values():
                show.close()
            if total is not None:
                total.close()
            if bar is not None:
                bar.stop()
        return time.perf_counter() - started

    def train_step(self, step: int, active: list[Member], shows: dict[str, ShowProgress]) -> bool:
        """Optimizer step `step` of every member in `active`; True when one of them wrote a log line."""
        work = [(m, i) for m in active for i in m.step_rows(step)]
        # Each member divides by its step's trained tokens over all processes, as trainer.py does alone.
        denominators = {m.name: max(m.trained_tokens(m.step_rows(step)), 1) for m in active}
        work.sort(key=lambda item: -len(item[0].train_rows[item[1]]["input_ids"]))  # stable: ties stay in order
        verdict = {m.name: 0.0 for m in active}  # 0 finite, 1 nan, 2 inf
        micro = [work[k:k + self.micro_rows] for k in range(0, len(work), self.micro_rows)]
        self.model.train()
        for batch in micro[self.rank::self.world]:
            self.forward_backward(batch, denominators, verdict)
        verdicts = _all_sum([verdict[m.name] for m in active])
        good = [m for m, v in zip(active, verdicts) if not v]
        self.sum_gradients(good)
        logged = False
        for m, v in zip(active, verdicts):
            if v:
                self.stop(m, step, BAD.get(v, "nan"))
                continue
            m.optimizer_step()
            m.end_step()
            shows[m.name].on_step_end(m.args, m.state, TrainerControl(), lr_scheduler=m.scheduler)
            logged = logged or m.step % m.recipe.training.log_every == 0 or m.step == m.total_steps
        evaluating = [m for m in good if m.wants_eval()]
        if evaluating:
            for m, metrics in zip(evaluating, self.evaluate(evaluating)):
                m.log_eval(metrics)
        for m in good:
            if m.wants_checkpoint():
                self.checkpoint(m)
        return logged

    def forward_backward(self, batch: list[tuple[Member, int]], denominators: dict[str, float],
                         verdict: dict[str, float]) -> None:
        rows = [m.train_rows[i] for m, i in batch]
        names = [m.name for m, _ in batch]
        tensors = {k: v.to(self.device) for k, v in self.collator(rows).items()}
        with route(names, self.device):
            sums = self.loss_sums(tensors, names)
            total = None
            for name, (loss_sum, trained) in sums.items():
                if not torch.isfinite(loss_sum):
                    verdict[name] = max(verdict[name], 1.0 if torch.isnan(loss_sum) else 2.0)
                    continue  # left out of backward: a NaN would reach no other adapter's weights, but its own
                member = next(m for m, _ in batch if m.name == name)
                real = sum(len(r["input_ids"]) for r, n in zip(rows, names) if n == name)
                member.meter.add(loss_sum.item(), trained, real)
                self.run_tokens += real
                term = loss_sum / denominators[name]
                total = term if total is None else total + term
            if total is not None:
                total.backward()  # inside `route`: a checkpointed layer runs its forward again here

    def loss_sums(self, tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
        """Summed cross-entropy over each adapter's trained positions in one forward: {name: (sum, count)}."""
        targets = tensors["shift_labels"]  # (B, T)
        mask = targets != IGNORE  # (B, T)
        order = list(dict.fromkeys(names))
        owner = torch.tensor([order.index(n) for n in names], device=targets.device)  # (B,)
        with self.selector.only(mask):
            # use_cache=False matters: with a KV cache transformers skips the packed-sequence mask (masking_utils).
            logits = self.model(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"],
                                use_cache=False).logits
        position_owner = owner[:, None].expand_as(mask)[mask]  # (K,) which adapter each trained position is
        picked = targets[mask]  # (K,)
        hidden = None
        if self.selector.fused:
            hidden, self.selector.hidden = self.selector.hidden, None  # (K, H)
        sums = {}
        for j, name in enumerate(order):
            sel = position_owner == j  # (K,)
            if hidden is not None:
                loss = chunked_cross_entropy(hidden[sel], self.selector.head.weight, picked[sel])
            else:
                loss = F.cross_entropy(logits[sel].float(), picked[sel], reduction="sum")
            sums[name] = (loss, int(sel.sum()))
        return sums

    def sum_gradients(self, members: list[Member]) -> None:
        """Add every process's gradients of these adapters (one all-reduce); each is already over the global count."""
        if self.world == 1 or not members:
            return
        import torch.distributed as dist

        params = [p for m in members for p in m.params]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    # ------------------------------------------------------------ eval, checkpoints, stops

    def evaluate(self, members: list[Member]) -> list[dict[str, float]]:
        """Token-weighted eval loss of each member on its own eval rows, in mixed micro-batches, no gradients."""
        import math

        work = [(m, i) for m in members for i in range(len(m.eval_rows))]
        work.sort(key=lambda item: -len(item[0].eval_rows[item[1]]["input_ids"]))
        micro = [work[k:k + self.micro_rows] for k in range(0, len(work), self.micro_rows)]
        totals = {m.name: [0.0, 0.0] for m in members}
        self.model.eval()
        with torch.no_grad():
            for batch in micro[self.rank::self.world]:
                names = [m.name for m, _ in batch]
                tensors = {k: v.to(self.device) for k, v in self.collator([m.eval_rows[i] for m, i in batch]).items()}
                with route(names, self.device):
                    for name, (loss_sum, trained) in self.loss_sums(tensors, names).items():
                        totals[name][0] += loss_sum.item()
                        totals[name][1] += trained
        self.model.train()
        summed = _all_sum([v for m in members for v in totals[m.name]])
        out = []
        for k, m in enumerate(members):
            loss = summed[2 * k] / max(summed[2 * k + 1], 1)
            out.append({"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
                        "eval_tokens": int(summed[2 * k + 1])})
        return out

    def checkpoint(self, member: Member) -> None:
        if self.is_main:
            member.save_checkpoint(self.model)
        _all_sum([0.0])  # a barrier: no rank runs ahead of a checkpoint being written

    def stop(self, member: Member, step: int, value: str) -> None:
        """A NaN or inf loss: this member stops (its last good checkpoint stays), or the run, as its recipe says."""
        member.drop_gradients()
        newest = checkpoints.newest(member.checkpoint_root)
        where = newest if newest is not None else member.checkpoint_root / "(none yet)"
        if member.recipe.training.on_nan == "run":
            raise NonFiniteLoss(f"{member.label}: loss became {value} at step {step + 1}; stopped the run "
                                f"(training.on_nan: run), last good checkpoint: {where} (try a lower training.lr)")
        member.failed = (f"{member.label}: loss became {value} at step {step + 1}; stopped this adapter, last good "
                         f"checkpoint: {where} (try a lower training.lr)")
        if self.is_main:
            self.console.print(f"[red]{member.failed}[/]")

    def interrupt(self, step: int) -> None:
        """SIGINT/SIGTERM: every unfinished member checkpoints its last step, then the run exits 130/143."""
        for m in self.members:
            newest = checkpoints.newest(m.checkpoint_root) if self.is_main else None
            saved = int(newest.name.rsplit("-", 1)[1]) if newest is not None else 0
            if not m.failed and _all_sum([float(saved != m.step)])[0] > 0:
                self.checkpoint(m)
        raise Interrupted(f"interrupted at step {step + 1}; checkpoints saved under each adapter's "
                          f"{checkpoints.CHECKPOINTS}/; continue with --resume", self.signals.received)

    def run_fields(self) -> dict[str, str]:
        """The run's line: adapters still training and the tokens/s of all of them together."""
        now = time.perf_counter()
        rate = _all_sum([float(self.run_tokens)])[0] / max(now - self.window_start, 1e-9)
        self.run_tokens, self.window_start = 0, now
        training = sum(not m.finished for m in self.members)
        return {"adapters": f"{training}/{len(self.members)} training", "tok/s": f"{rate:,.0f}"}


def failures(members: Sequence[Member]) -> RunFailed | None:
    stopped = [m for m in members if m.failed]
    if not stopped:
        return None
    written = len(members) - len(stopped)
    return RunFailed("; ".join(m.failed for m in stopped) + f" ({written} of {len(members)} adapters written)")
