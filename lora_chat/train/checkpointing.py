"""`training.gradient_checkpointing: auto`: off when this run fits its device without it, else on.

Checkpointing keeps only each layer's input and recomputes the layer in the backward pass: far less activation
memory, for about 1.4x the step time on this project's CPU (bench/RESULTS.md). Whether the memory is needed is
known before any weight loads: `lorachat plan`'s estimate (plan/memory.py) of this run's longest micro-batch
without checkpointing, against the memory of the device that trains it.

Every process of a distributed run decides from the same recipe and data and its own device; ranks on the same
kind of card (or the same host's RAM, shared by its local processes) decide alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LorachatError, Where
from ..files import human_size
from ..recipe import LoadedRecipe

CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


@dataclass(frozen=True)
class Checkpointing:
    on: bool
    why: str

    def __str__(self) -> str:
        return f"{'on' if self.on else 'off'} ({self.why})"


def decide(loaded: LoadedRecipe, stats, base, dtype) -> Checkpointing:
    """The recipe's setting, or for `auto` the plan's verdict for this run on this device.

    `stats` are the train split's encoding stats (encoding.SplitStats), `base` the resolved base, `dtype` the
    torch dtype the base computes in.
    """
    setting = loaded.recipe.training.gradient_checkpointing
    if setting != "auto":
        return Checkpointing(setting, "set in the recipe")
    from ..models.facts import read_config
    from ..plan.estimate import DataLengths, setup_of
    from ..plan.memory import AUTO_CHECKPOINTING_SHARE, Shape, auto_checkpointing, estimate

    try:
        shape = Shape.from_config(read_config(base), Where(base.path / "config.json"))
    except LorachatError as err:
        return Checkpointing(True, f"auto: the run's memory cannot be estimated: {err.reason}")
    device, memory = device_memory()
    setup = setup_of(loaded, DataLengths.measured(stats)).changed(device=device, compute_bytes=dtype.itemsize)
    chosen = auto_checkpointing(shape, setup, memory)
    need = human_size(estimate(shape, setup.changed(checkpointing=False)).total)
    share = f"{AUTO_CHECKPOINTING_SHARE[device]:.0%} of {human_size(memory)} {'GPU memory' if device == 'cuda' else 'RAM'}"
    return Checkpointing(chosen.checkpointing, f"auto: the run needs ~{need} without it, "
                                               f"{'over' if chosen.checkpointing else 'within'} {share}")


def device_memory() -> tuple[str, int]:
    """("cuda", the card's memory) or ("cpu", this process's share of the RAM the machine or container allows)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in CGROUP_LIMITS:  # a container's limit (cgroup v2, then v1) is what the OOM killer enforces
        try:
            ram = min(ram, int(limit.read_text().strip()))
        except (OSError, ValueError):  # absent, or "max"
            continue
    return "cpu", ram // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
