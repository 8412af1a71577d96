"""One adapter of a joint run: its rows and their order, its optimizer and schedule, its log and checkpoints.

Each member reproduces what `lorachat finetune` alone would do with its recipe, piece by piece, with the same
code where there is one: the order of its rows is sampler.py's `StepSortedSampler` (the same seed, epoch and rows per
step), its optimizer and schedule are built by transformers' `Trainer` from the same `TrainingArguments`
(`sft_config`), its step counts are run.py's `_steps`, its log lines are callbacks.py's `StepLog`, its progress
`ShowProgress`, and its checkpoints are checkpoints.py's folders holding what the Trainer's hold (adapter,
optimizer.pt, scheduler.pt, trainer_state.json). So optimizer step s of a member trains exactly the rows step s
of the single run trains, with the same learning rate.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerControl, TrainerState, get_scheduler

from ...errors import RunFailed
from ...templates import IGNORE
from .. import checkpoints
from ..checkpointing import peak_memory
from ..callbacks import StepLog, StepMeter, truncate_log
from ..collate import Row
from ..run import OPTIMIZERS, _steps, output_dir, save_weights
from ..sampler import StepSortedSampler


@dataclass
class Member:
    """An adapter being trained: `name` is its PEFT adapter name inside the shared model."""

    name: str
    inputs: Any  # inputs.Inputs
    prepared: Any  # encoding.Prepared
    train_rows: list[Row]
    eval_rows: list[Row]
    resume_from: Path | None
    processes: int
    checkpointing: Any = None  # checkpointing.Checkpointing decided for this recipe, recorded in metrics.json
    meter: StepMeter = field(default_factory=StepMeter)
    failed: str | None = None  # why it stopped early (a NaN), or None
    eval_metrics: dict[str, float] | None = None  # of the last eval pass, at `eval_step`
    eval_step: int = -1

    def __post_init__(self) -> None:
        t = self.recipe.training
        self.target = output_dir(self.inputs.loaded)
        self.checkpoint_root = self.target / checkpoints.CHECKPOINTS
        self.log_path = self.target / "train_log.jsonl"
        self.total_steps, self.epochs = _steps(self.recipe, len(self.train_rows), self.processes)
        self.micro_batches = max(-(-len(self.train_rows) // (t.batch_size * self.processes)), 1)  # per epoch
        self.steps_per_epoch = max(-(-self.micro_batches // t.grad_accum), 1)
        self.rows_per_step = t.batch_size * t.grad_accum * self.processes
        self.lengths = [len(r["input_ids"]) for r in self.train_rows]
        self.state = TrainerState(max_steps=self.total_steps, logging_steps=t.log_every,
                                  num_train_epochs=self.epochs, is_world_process_zero=True)
        self._orders: dict[int, list[int]] = {}

    @property
    def loaded(self):
        return self.inputs.loaded

    @property
    def recipe(self):
        return self.inputs.loaded.recipe

    @property
    def label(self) -> str:
        return self.recipe.name

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.state.global_step

    @property
    def finished(self) -> bool:
        return self.failed is not None or self.step >= self.total_steps

    # ------------------------------------------------------------ rows

    def step_rows(self, step: int) -> list[int]:
        """Indices of the train rows of optimizer step `step` (0-based), as the single run's sampler gives them."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            sampler = StepSortedSampler(self.lengths, self.rows_per_step, self.recipe.training.seed)
            sampler.set_epoch(epoch)
            self._orders = {epoch: list(sampler)}  # one epoch at a time: steps only move forward
        return self._orders[epoch][k * self.rows_per_step:(k + 1) * self.rows_per_step]

    def trained_tokens(self, rows: list[int]) -> int:
        return sum(sum(1 for t in self.train_rows[i]["targets"] if t != IGNORE) for i in rows)

    # ------------------------------------------------------------ optimizer and schedule

    def build_optimizer(self, model: torch.nn.Module, is_main: bool) -> None:
        """The optimizer and schedule the single run's Trainer makes for these settings, over this adapter only."""
        from ..trainer import sft_config

        t = self.recipe.training
        self.args = sft_config(
            output_dir=str(self.checkpoint_root), learning_rate=t.lr, lr_scheduler_type=t.scheduler,
            warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
            optim=OPTIMIZERS[t.optimizer], seed=t.seed, data_seed=t.seed, report_to=[],
            use_cpu=not torch.cuda.is_available())
        marker = f".{self.name}."
        named = [(n, p) for n, p in model.named_parameters() if marker in n]
        for _, p in named:
            p.requires_grad_(True)
        self.params = [p for _, p in named]
        decay = set(Trainer.get_decay_parameter_names(None, model))
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": t.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = cls(groups, **kwargs)
        self.scheduler = get_scheduler(t.scheduler, optimizer=self.optimizer,
                                       num_warmup_steps=self.args.get_warmup_steps(self.total_steps),
                                       num_training_steps=self.total_steps,
                                       scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        self.log = StepLog(self.meter, self.log_path, t.log_every)
        self.state.is_world_process_zero = is_main

    def optimizer_step(self) -> None:
        """Clip this adapter's gradient on its own (as the single run clips its whole model's), then step."""
        t = self.recipe.training
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def drop_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def end_step(self) -> None:
        """Close the optimizer step: count it, and write the log line at log steps (callbacks.StepLog)."""
        self.state.global_step += 1
        # As the Trainer counts it: micro-batches of the epoch done so far, over the epoch's micro-batches.
        epoch, k = divmod(self.state.global_step - 1, self.steps_per_epoch)
        ga = self.recipe.training.grad_accum
        self.state.epoch = epoch + min((k + 1) * ga, self.micro_batches) / self.micro_batches
        self.log.on_step_end(self.args, self.state, TrainerControl(), lr_scheduler=self.scheduler)
        self.state.num_input_tokens_seen = self.meter.total_tokens

    def log_eval(self, metrics: dict[str, float]) -> None:
        self.eval_metrics, self.eval_step = metrics, self.step
        self.state.log_history.append({**metrics, "step": self.step})
        self.log.on_log(self.args, self.state, TrainerControl(), logs=metrics)

    def wants_eval(self) -> bool:
        every = self.recipe.training.eval_every
        return bool(self.eval_rows) and (self.step == self.total_steps or bool(every and self.step % every == 0))

    def wants_checkpoint(self) -> bool:
        every = self.recipe.training.save_every
        return bool(every) and self.step % every == 0

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, model: torch.nn.Module) -> None:
        """checkpoint-N with what the single run's Trainer writes for resume, published whole or not at all."""
        import errno

        root, step = self.checkpoint_root, self.step
        staging = checkpoints.staging_dir(root, step)
        try:
            staging.mkdir(parents=True, exist_ok=True)
            save_weights(model, staging, self.name)
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
            self.state.save_to_json(str(staging / "trainer_state.json"))
            checkpoints.publish(staging, root / f"checkpoint-{step}")
            checkpoints.rotate(root, self.recipe.training.keep_checkpoints)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            reason = "disk full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
            previous = checkpoints.newest(root)
            kept = f"; {previous.name} is intact" if previous else ""
            raise RunFailed(f"{root}: cannot save checkpoint-{step}: {reason}{kept}") from err

    def load_checkpoint(self, model: torch.nn.Module) -> None:
        """Continue from `resume_from`: weights, optimizer, schedule, step and log as they were saved."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = self.resume_from
        weights = load_file(str(folder / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights, adapter_name=self.name)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        saved = TrainerState.load_from_json(str(folder / "trainer_state.json"))
        self.state.global_step, self.state.epoch = saved.global_step, saved.epoch
        self.state.log_history = saved.log_history
        self.meter.total_tokens = saved.num_input_tokens_seen

    def prepare_output(self) -> None:
        """A checkpoint folder without a killed run's leftovers, and a log that starts where training does."""
        self.checkpoint_root.mkdir(parents=True, exist_ok=True)
        checkpoints.sweep(self.checkpoint_root)
        if self.resume_from is not None:
            truncate_log(self.log_path, int(self.resume_from.name.rsplit("-", 1)[1]))
        elif self.log_path.exists():
            self.log_path.unlink()

    def metrics(self, runtime_s: float) -> dict[str, Any]:
        """metrics.json's content, as the single run writes it (run.FinetuneRun.evaluate)."""
        from ..run import _last_logged_loss

        metrics: dict[str, Any] = {"train": {
            "loss": _last_logged_loss(self.log_path), "steps": self.step, "epochs": round(self.state.epoch or 0.0, 4),
            "tokens": self.meter.total_tokens, "gradient_checkpointing": self.checkpointing.on,
            "runtime_s": round(runtime_s, 2), "samples": len(self.prepared.train), "rows": len(self.train_rows),
            "peak_memory": peak_memory()}}  # the joint run's, shared by its adapters
        if self.eval_metrics is not None:
            metrics["eval"] = {"loss": self.eval_metrics["eval_loss"],
                               "perplexity": self.eval_metrics["eval_perplexity"],
                               "tokens": self.eval_metrics["eval_tokens"], "samples": len(self.prepared.eval)}
        return metrics
