"""Progress of one long task: a rich bar in a terminal, plain timed lines everywhere else.

A log file, `| tee`, CI or `nohup` cannot show a redrawn bar, and a silent command looks hung. So when the
console is not a terminal, `Progress` prints one plain line

    train 12/40 (30%) | epoch 0.30 | loss 2.1034 | lr 1.95e-04 | tok/s 1,234 | elapsed 1m02s | eta 2m25s

at least every `every` seconds (a timer thread, so a single slow step still shows life), whenever the caller
asks for one (`update(n, fields, line=True)`: the trainer does at each log step), and once at the end.

    with Progress(console, "eval", total=len(batches)) as progress:
        for i, batch in enumerate(batches, 1):
            ...
            progress.update(i, {"loss": f"{loss:.4f}"})
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

EVERY_S = 30.0  # longest silence when not in a terminal


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s: short enough for a progress line."""
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def bars(console: Console) -> RichProgress:
    """A rich bar with one row per task (its label first), for one `Progress` or several sharing it."""
    return RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[text]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


class Progress:
    """`update(completed, fields)` as work advances; `close()` (or leaving the `with`) at the end.

    `fields` are shown in the order first given, as `name value`; values are preformatted strings. `start` is where a
    resumed task begins, so the ETA counts only work done in this process.
    """

    def __init__(self, console: Console, label: str, total: int, *, start: int = 0, every: float = EVERY_S,
                 bar: RichProgress | None = None):
        """`bar`: a rich bar of several tasks (`bars(console)`) this one adds a row to; it is started and stopped by
        its owner, since a terminal shows one live display at a time."""
        self.console, self.label, self.total, self.every = console, label, total, every
        self.start, self.completed = start, start
        self.fields: dict[str, str] = {}
        self.started = time.monotonic()
        self._last_line = self.started
        self._printed: tuple | None = None  # (completed, fields) of the last plain line
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._bar: RichProgress | None = None
        self._owns_bar = bar is None
        self._timer: threading.Thread | None = None
        if console.is_terminal:
            self._bar = bar or bars(console)
            self._task = self._bar.add_task(label, total=total, completed=start, text="")
            if self._owns_bar:
                self._bar.start()
        else:
            self._timer = threading.Thread(target=self._tick, name=f"progress-{label}", daemon=True)
            self._timer.start()

    def update(self, completed: int, fields: Mapping[str, str] | None = None, *, line: bool = False) -> None:
        """Record progress; `line=True` prints a plain line now (when not in a terminal)."""
        with self._lock:
            self.completed = completed
            self.fields.update(fields or {})
            if self._bar is not None:
                self._bar.update(self._task, completed=completed, text=self._fields_text("  "))
            elif line:
                self._print_line()

    def close(self) -> None:
        """Stop the bar or the timer; a plain console gets a last line with the final state."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._bar is not None:
            if self._owns_bar:
                self._bar.stop()
            return
        self._timer.join()
        with self._lock:
            if self._printed != self._state():  # the final state, unless its line was just printed
                self._print_line()

    def line(self) -> str:
        """The plain progress line for the current state."""
        elapsed = time.monotonic() - self.started
        done = self.completed - self.start
        parts = [f"{self.label} {self.completed}/{self.total}"
                 + (f" ({100 * self.completed / self.total:.0f}%)" if self.total else "")]
        if self.fields:
            parts.append(self._fields_text(" | "))
        parts.append(f"elapsed {duration(elapsed)}")
        if 0 < done and self.completed < self.total:
            parts.append(f"eta {duration(elapsed / done * (self.total - self.completed))}")
        return " | ".join(parts)

    def _fields_text(self, sep: str) -> str:
        return sep.join(f"{name} {value}" for name, value in self.fields.items())

    def _state(self) -> tuple:
        return self.completed, tuple(self.fields.items())

    def _print_line(self) -> None:
        self.console.out(self.line(), highlight=False)
        self.console.file.flush()
        self._last_line, self._printed = time.monotonic(), self._state()

    def _tick(self) -> None:
        while not self._closed.wait(timeout=max(self._last_line + self.every - time.monotonic(), 0.01)):
            with self._lock:
                if time.monotonic() - self._last_line >= self.every:
                    self._print_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
