"""`--processes N`: the same run as N processes under `torch.distributed.run` (accelerate picks the backend:
NCCL on GPUs, gloo on CPU). Each worker runs `finetune` unchanged; transformers' Trainer (through accelerate)
wraps the model in DDP (with `training.distributed: fsdp`, shards it with FSDP2's fully_shard instead) and shards
the data, rank 0 logs, checkpoints and writes the adapter.

Multi-node: run the same command on every node with torchrun's rendezvous flags, e.g.
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m lora_chat.train.distributed RECIPE [--set k=v] [--resume]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..errors import LorachatError, RunFailed


class WorkersFailed(RunFailed):
    def __init__(self, reason: str, exit_code: int):
        self.exit_code = exit_code
        super().__init__(reason)


def in_worker() -> bool:
    return "LOCAL_RANK" in os.environ


def launch(recipe_path: str | Path, overrides, options) -> Path:
    """Run the recipe as `options.processes` local processes; return the adapter directory."""
    from ..recipe import load_recipe
    from .run import PREFLIGHT_DONE, output_dir

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={options.processes}", "-m", "lora_chat.train.distributed", str(recipe_path)]
    for override in overrides:
        command += ["--set", override]
    if options.resume:
        command.append("--resume")
    env = {**os.environ, PREFLIGHT_DONE: "1", "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.processes)))}
    code = subprocess.run(command, env=env).returncode
    if code != 0:
        raise WorkersFailed(f"{options.processes} processes: a worker failed with exit code {code} "
                            f"(its error is above)", code)
    return output_dir(load_recipe(recipe_path, list(overrides)))


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: `python -m lora_chat.train.distributed RECIPE [--set k=v]... [--resume]`."""
    from .run import Options, finetune

    parser = argparse.ArgumentParser(prog="lora_chat.train.distributed")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    try:
        finetune(args.recipe, args.overrides, Options(resume=args.resume))
    except LorachatError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            for line in str(err).splitlines():
                print(f"error: {line}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
