"""`training.gradient_checkpointing`: auto picks the fastest of off, on and offload that fits this run's device.

Checkpointing keeps only each layer's input and recomputes the layer in the backward pass: far less activation
memory, for about 1.4x the step time on this project's CPU (bench/RESULTS.md). Whether the memory is needed is
known before any weight loads: `lorachat plan`'s estimate (plan/memory.py) of this run's longest micro-batch
without checkpointing, against the memory of the device that trains it.

Every process of a distributed run decides from the same recipe and data and its own device; ranks on the same
kind of card (or the same host's RAM, shared by its local processes) decide alike.

`offload` keeps checkpointing's saved layer inputs in pinned host memory (TRL's activation offloading, copied on a
side stream), so a GPU holds only the few in flight: the longest contexts on a small card.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import LorachatError, Where
from ..files import human_size
from ..plan import host
from ..recipe import LoadedRecipe


@dataclass(frozen=True)
class Checkpointing:
    on: bool
    why: str
    offload: bool = False  # the saved layer inputs go to pinned host memory (TRL's activation offloading)

    def __str__(self) -> str:
        return f"{'offloaded to host memory' if self.offload else 'on' if self.on else 'off'} ({self.why})"


def decide(loaded: LoadedRecipe, stats, base, dtype) -> Checkpointing:
    """The recipe's setting, or for `auto` the plan's verdict for this run on this device.

    `stats` are the train split's encoding stats (encoding.SplitStats), `base` the resolved base, `dtype` the
    torch dtype the base computes in. `offload` is refused here, before any weight loads, when the host cannot
    hold the checkpoints.
    """
    setting = loaded.recipe.training.gradient_checkpointing
    if isinstance(setting, bool):
        return Checkpointing(setting, "set in the recipe")
    from ..models.facts import read_config
    from ..plan.estimate import DataLengths, setup_of
    from ..plan.memory import (AUTO_CHECKPOINTING_SHARE, HOST_OFFLOAD_SHARE, Shape, auto_checkpointing, estimate,
                               host_offload_bytes)

    device, memory = device_memory()
    if setting == "offload" and device != "cuda":
        return Checkpointing(True, "offload set in the recipe; on a CPU the checkpoints are in RAM already")
    try:
        shape = Shape.from_config(read_config(base), Where(base.path / "config.json"))
    except LorachatError as err:
        if setting == "offload":
            return Checkpointing(True, "set in the recipe", offload=True)
        return Checkpointing(True, f"auto: the run's memory cannot be estimated: {err.reason}")
    setup = setup_of(loaded, DataLengths.measured(stats)).changed(device=device, compute_bytes=dtype.itemsize)
    free = host.available_bytes() // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    if setting == "offload":
        need = host_offload_bytes(shape, setup.changed(checkpointing=True, offload=True))
        if need > HOST_OFFLOAD_SHARE * free:
            raise LorachatError(
                f"offload needs ~{human_size(need)} of pinned host memory for the checkpoints of the longest "
                f"micro-batch; {human_size(free)} is available and at most {HOST_OFFLOAD_SHARE:.0%} of it can be "
                f"pinned; use true (checkpoints on the GPU) or shorten data.max_length",
                loaded.where("training", "gradient_checkpointing"))
        return Checkpointing(True, f"set in the recipe: ~{human_size(need)} of checkpoints in pinned host memory",
                             offload=True)
    chosen = auto_checkpointing(shape, setup, memory, free)
    need = human_size(estimate(shape, setup.changed(checkpointing=False, offload=False)).total)
    share = f"{AUTO_CHECKPOINTING_SHARE[device]:.0%} of {human_size(memory)} {'GPU memory' if device == 'cuda' else 'RAM'}"
    if chosen.offload:
        host_need = human_size(host_offload_bytes(shape, chosen))
        return Checkpointing(True, f"auto: only fits {share} with the checkpoints in host memory (~{host_need})",
                             offload=True)
    return Checkpointing(chosen.checkpointing, f"auto: the run needs ~{need} without it, "
                                               f"{'over' if chosen.checkpointing else 'within'} {share}")


def peak_memory() -> dict[str, int | str]:
    """This process's peak memory so far, for metrics.json: on CUDA what PyTorch's caching allocator reserved and
    allocated (`lorachat plan`'s `reserved_gib` estimates the first), on a CPU the peak resident set."""
    import sys

    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "max_reserved_bytes": torch.cuda.max_memory_reserved(),
                "max_allocated_bytes": torch.cuda.max_memory_allocated()}
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"device": "cpu", "peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}


def device_memory() -> tuple[str, int]:
    """("cuda", the card's memory) or ("cpu", this process's share of the RAM the machine or container allows)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return "cpu", host.ram_bytes() // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
