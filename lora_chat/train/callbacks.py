"""What happens around each optimizer step: metering, the JSONL log, the progress bar, stopping on signals.

`StepMeter` is filled by the trainer's loss (per micro-batch) and closed once per optimizer step by
`MeterCallback`, which must run before the others read it.
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback

from ..errors import RunFailed


def _all_sum(values: list[float]) -> list[float]:
    """Sum across processes (a collective: every rank must call it at the same point)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class StepMeter:
    """Loss sums and token counts: for the step under way, the last step, and since the last log line."""

    loss_sum: float = 0.0
    trained: int = 0
    tokens: int = 0  # real (non-pad) input tokens
    last_loss: float = float("nan")
    last_tokens_per_s: float = 0.0
    window: list[float] = field(default_factory=lambda: [0.0, 0, 0])  # loss_sum, trained, tokens
    window_start: float = field(default_factory=time.perf_counter)
    step_start: float = field(default_factory=time.perf_counter)
    total_tokens: int = 0

    def add(self, loss_sum: float, trained: int, tokens: int) -> None:
        self.loss_sum += loss_sum
        self.trained += trained
        self.tokens += tokens

    def end_step(self) -> None:
        now = time.perf_counter()
        self.last_loss = self.loss_sum / max(self.trained, 1)
        self.last_tokens_per_s = self.tokens / max(now - self.step_start, 1e-9)
        self.window = [self.window[0] + self.loss_sum, self.window[1] + self.trained, self.window[2] + self.tokens]
        self.total_tokens += self.tokens
        self.loss_sum, self.trained, self.tokens = 0.0, 0, 0
        self.step_start = now

    def take_window(self) -> tuple[float, float]:
        """(mean loss, tokens/s) across all processes since the last call."""
        loss_sum, trained, tokens = _all_sum(self.window)
        now = time.perf_counter()
        result = loss_sum / max(trained, 1), tokens / max(now - self.window_start, 1e-9)
        self.window, self.window_start = [0.0, 0, 0], now
        return result


class MeterCallback(TrainerCallback):
    def __init__(self, meter: StepMeter):
        self.meter = meter

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter.step_start = self.meter.window_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.meter.end_step()


class JsonlLog(TrainerCallback):
    """`train_log.jsonl`: one line per `log_every` steps (loss, lr, tokens/s), and one per eval pass."""

    def __init__(self, meter: StepMeter, path: Path, log_every: int):
        self.meter, self.path, self.log_every = meter, path, log_every

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if state.global_step % self.log_every and state.global_step != state.max_steps:
            return
        loss, tokens_per_s = self.meter.take_window()  # collective: all ranks, same step
        if not math.isfinite(loss):
            return  # the trainer raises NonFiniteLoss itself; a NaN line would only confuse plots
        if state.is_world_process_zero:
            lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else None
            self._write({"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "loss": loss,
                         "lr": lr, "tokens_per_s": round(tokens_per_s, 1), "tokens": self.meter.total_tokens})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "eval_loss" in logs:
            self._write({"step": state.global_step, "eval_loss": logs["eval_loss"]})


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step`: a resumed run redoes those steps and logs them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class ProgressBar(TrainerCallback):
    """A rich bar on the main process: step, loss, lr, tokens/s and ETA."""

    def __init__(self, meter: StepMeter, console: Console):
        self.meter, self.console, self.progress, self.task = meter, console, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss="-", lr="-", tps="-")
        self.progress.start()

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if self.progress is None:
            return
        lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else float("nan")
        self.progress.update(self.task, completed=state.global_step, loss=f"{self.meter.last_loss:.4f}",
                             lr=f"{lr:.2e}", tps=f"{self.meter.last_tokens_per_s:,.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
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
