"""`lora_chat.progress`: what a long command prints when its output is a file or a pipe."""

from __future__ import annotations

import io
import time

from rich.console import Console

from lora_chat.progress import Progress, duration


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False), buffer


def test_a_silent_stretch_still_prints_a_line_every_interval():
    """A step longer than the interval must not leave the log silent: a timer prints the current state."""
    console, buffer = plain_console()
    progress = Progress(console, "eval", total=10, every=0.05)
    progress.update(3, {"loss": "1.2345"})
    time.sleep(0.3)
    progress.close()
    lines = buffer.getvalue().splitlines()
    assert len(lines) >= 3
    assert all(line.startswith("eval 3/10 (30%) | loss 1.2345 | elapsed ") for line in lines)


def test_lines_on_request_and_one_at_the_end():
    console, buffer = plain_console()
    with Progress(console, "train", total=4, every=60) as progress:
        progress.update(2, {"loss": "2.0"}, line=True)
        progress.update(4, {"loss": "1.5"})
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("train 2/4 (50%) | loss 2.0 | elapsed ") and " | eta " in lines[0]
    assert lines[1].startswith("train 4/4 (100%) | loss 1.5 | elapsed ") and "eta" not in lines[1]
    assert len(lines) == 2


def test_the_end_line_is_not_repeated_when_the_last_update_printed_it():
    console, buffer = plain_console()
    with Progress(console, "train", total=2, every=60) as progress:
        progress.update(2, {"loss": "1.0"}, line=True)
    assert len(buffer.getvalue().splitlines()) == 1


def test_a_terminal_gets_a_bar_and_no_plain_lines():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    with Progress(console, "train", total=2, every=0.01) as progress:
        progress.update(1, {"loss": "1.0"}, line=True)
        time.sleep(0.05)
    assert "train 1/2 (50%) |" not in buffer.getvalue()
    assert "1/2" in buffer.getvalue() or "2/2" in buffer.getvalue()


def test_durations_read_short():
    assert [duration(s) for s in (4, 65, 3725)] == ["4s", "1m05s", "1h02m"]
