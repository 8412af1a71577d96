"""Checkpoints that are either complete or absent.

A checkpoint is written into `checkpoints/.tmp-checkpoint-N/`, every file fsynced, then renamed to
`checkpoint-N` and the folder fsynced: rename is atomic, so a `checkpoint-N` folder is always whole, and a
kill at any moment leaves at worst a `.tmp-*` folder that is ignored and swept up on the next start.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..files import fsync_dir, fsync_tree

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# What resume needs; a folder missing any of them is not a checkpoint we can continue from. Each entry
# is a set of alternatives: accelerate's FSDP saver writes the gathered optimizer state as optimizer.bin.
REQUIRED = (("adapter_model.safetensors",), ("optimizer.pt", "optimizer.bin"), ("scheduler.pt",),
            ("trainer_state.json",))


def staging_dir(root: Path, step: int) -> Path:
    return root / f".tmp-checkpoint-{step}"


def publish(staging: Path, final: Path) -> None:
    """fsync everything in `staging`, then rename it to `final` in one step."""
    fsync_tree(staging)
    if final.exists():  # a checkpoint of the same step from a run that died after renaming it
        shutil.rmtree(final)
    os.rename(staging, final)
    fsync_dir(final.parent)


def complete(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and all(any((child / name).is_file() for name in names)
                                            for names in REQUIRED):
            found.append((int(match.group(1)), child))
    return sorted(found)


def newest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1][1] if found else None


def rotate(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, oldest first."""
    for _, folder in complete(root)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def sweep(root: Path) -> None:
    """Remove half-written checkpoints a killed run left behind."""
    if root.is_dir():
        for child in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(child, ignore_errors=True)
