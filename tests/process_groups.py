"""Who is left in a process group, read from /proc: the check that stopping a server left nothing running."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def members(pgid: int, *, zombies: bool = True) -> list[str]:
    """'pid state' of every process in group `pgid` (independently of lorachat's own check)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and (zombies or fields[0] != "Z"):
            found.append(f"{stat.parent.name} {fields[0]}")
    return found


def wait_until(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    """Poll `condition` until it holds; else fail saying `what` (a string, or a callable for the state then)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.05)
