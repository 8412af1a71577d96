"""What happens around each optimizer step: metering, the JSONL log, progress, stopping on signals.

`StepMeter` is filled by the trainer's loss (per micro-batch) and closed once per optimizer step by `StepLog`,
which must run before `ShowProgress` reads it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist
from rich.console import Console
from transformers import TrainerCallback

from ..errors import RunFailed
from ..progress import Progress


def _all_sum(values: list[float]) -> list[float]:
    """Sum across processes (a collective: every rank must call it at the same point)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class StepMeter:
    """Loss sums and real-token counts: for the step under way, and since the last log line (all processes).

    The trainer's loss adds each micro-batch; `StepLog` closes each optimizer step and, at log steps, sums the
    window across processes, so `loss`, `tokens_per_s` and `total_tokens` count every rank's tokens.
    """

    loss_sum: float = 0.0
    trained: int = 0
    tokens: int = 0  # real (non-pad) input tokens
    window: list[float] = field(default_factory=lambda: [0.0, 0, 0])  # loss_sum, trained, tokens
    window_start: float = field(default_factory=time.perf_counter)
    loss: float = float("nan")  # of the last log window
    tokens_per_s: float = float("nan")  # of the last log window, all processes
    total_tokens: int = 0  # all processes, up to the last log window

    def add(self, loss_sum: float, trained: int, tokens: int) -> None:
        self.loss_sum += loss_sum
        self.trained += trained
        self.tokens += tokens

    def end_step(self) -> None:
        self.window = [self.window[0] + self.loss_sum, self.window[1] + self.trained, self.window[2] + self.tokens]
        self.loss_sum, self.trained, self.tokens = 0.0, 0, 0

    def close_window(self) -> None:
        """Sum the window across processes (a collective: every rank calls it at the same step)."""
        loss_sum, trained, tokens = _all_sum(self.window)
        now = time.perf_counter()
        self.loss = loss_sum / max(trained, 1)
        self.tokens_per_s = tokens / max(now - self.window_start, 1e-9)
        self.total_tokens += int(tokens)
        self.window, self.window_start = [0.0, 0, 0], now


class StepLog(TrainerCallback):
    """Closes each step in the meter and, every `log_every` steps and at the last, writes `train_log.jsonl`
    (loss, lr, tokens/s); one more line per eval pass. Must run before `ShowProgress`, which reads the meter."""

    def __init__(self, meter: StepMeter, path: Path, log_every: int):
        self.meter, self.path, self.log_every = meter, path, log_every

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter.window_start = time.perf_counter()

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.meter.end_step()
        if not is_log_step(state, self.log_every):
            return
        self.meter.close_window()
        if not math.isfinite(self.meter.loss):
            return  # the trainer raises NonFiniteLoss itself; a NaN line would only confuse plots
        if state.is_world_process_zero:
            self._write({"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "loss": self.meter.loss,
                         "lr": current_lr(lr_scheduler), "tokens_per_s": round(self.meter.tokens_per_s, 1),
                         "tokens": self.meter.total_tokens})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "eval_loss" in logs:
            self._write({"step": state.global_step, "eval_loss": logs["eval_loss"]})


def is_log_step(state, log_every: int) -> bool:
    return state.global_step % log_every == 0 or state.global_step == state.max_steps


def current_lr(lr_scheduler) -> float | None:
    return lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else None


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step`: a resumed run redoes those steps and logs them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class ShowProgress(TrainerCallback):
    """Training progress on the main process (`lora_chat.progress`): a rich bar in a terminal; otherwise a plain
    line at every log step, at least every 30 s, and at the end (step/total, epoch, loss, lr, tok/s, ETA)."""

    def __init__(self, meter: StepMeter, console: Console, log_every: int, label: str = "train", bar=None):
        self.meter, self.console, self.log_every = meter, console, log_every
        self.label, self.bar = label, bar  # a joint run: the adapter's name, one row of the run's shared bar
        self.progress: Progress | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress = Progress(self.console, self.label, total=state.max_steps, start=state.global_step,
                                     bar=self.bar)

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if self.progress is None:
            return
        # loss and tok/s are those of the last log window (all processes), as in train_log.jsonl
        seen = math.isfinite(self.meter.tokens_per_s)
        fields = {"epoch": f"{state.epoch or 0.0:.2f}", "loss": f"{self.meter.loss:.4f}" if seen else "-",
                  "lr": f"{current_lr(lr_scheduler) or 0.0:.2e}",
                  "tok/s": f"{self.meter.tokens_per_s:,.0f}" if seen else "-"}
        self.progress.update(state.global_step, fields, line=is_log_step(state, self.log_every))

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None


class Interrupted(RunFailed):
    """Stopped by SIGINT/SIGTERM after saving a checkpoint; exit 128 + signal number (130, 143)."""

    def __init__(self, reason: str, signum: int):
        self.exit_code = 128 + signum
        super().__init__(reason)


class Signals:
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. Second: abort at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # the user asked twice: no checkpoint, no cleanup
        self.received = signum


class StopOnSignal(TrainerCallback):
    def __init__(self, signals: Signals):
        self.signals = signals

    def on_step_end(self, args, state, control, **kwargs):
        # All ranks must agree, or one would wait forever in the next all-reduce.
        if _all_sum([float(self.signals.received or 0)])[0] > 0:
            control.should_save = True
            control.should_training_stop = True
