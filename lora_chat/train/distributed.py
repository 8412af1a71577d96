"""Several processes: `--processes N` starts them, and `lorachat finetune` runs unchanged inside each one.

`launch` runs `torch.distributed.run` with N local workers, each `python -m lora_chat.cli finetune RECIPE ...`;
a run started by the user's own launcher is the same thing (accelerate launch, torchrun, multi-node):

    accelerate launch --num_processes 2 -m lora_chat.cli finetune RECIPE [--set k=v] [--resume]
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m lora_chat.cli finetune RECIPE [--set k=v] [--resume]

Inside a worker, accelerate (through the Trainer) picks the backend (NCCL on GPUs, gloo on CPU), wraps the model
in DDP (with `training.distributed: fsdp`, shards it with FSDP2's fully_shard instead) and shards the data; rank 0
logs, checkpoints and writes the adapter. A worker knows it is one from the launcher's own variables
(WORLD_SIZE, RANK), which every launcher sets.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..errors import RunFailed


class WorkersFailed(RunFailed):
    def __init__(self, reason: str, exit_code: int):
        self.exit_code = exit_code
        super().__init__(reason)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def in_worker() -> bool:
    """Started by a distributed launcher (torch.distributed.run, torchrun, accelerate launch) as one of several."""
    return world_size() > 1


def launch(processes: int, finetune_args: list[str]) -> None:
    """Run `lorachat finetune *finetune_args` as `processes` local workers; raise if any fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "lora_chat.cli", "finetune", *finetune_args]
    # Each worker gets its share of the cores: N workers each using all of them would thrash.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))}
    code = subprocess.run(command, env=env).returncode
    if code != 0:
        raise WorkersFailed(f"{processes} processes: a worker failed with exit code {code} (its error is above)", code)
