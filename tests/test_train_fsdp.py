"""`training.distributed: fsdp` with `--processes 2` on CPU (gloo, FSDP2): same training as DDP, one full adapter,
checkpoints that `--resume` continues from."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import finetune, log_lines, losses, out_dir

# Runs the workers as `--processes 2` would, but every worker dies abruptly (no checkpoint, no cleanup) when it
# is about to start step DIE_AT + 1, i.e. right after checkpoint-DIE_AT was written.
DIE_AFTER_STEP = """
import os, sys
from lora_chat.train import trainer
step = trainer.LorachatTrainer.training_step
def die(self, *a, **k):
    if self.state.global_step == int(os.environ["DIE_AT"]):
        os._exit(9)
    return step(self, *a, **k)
trainer.LorachatTrainer.training_step = die
from lora_chat.cli import main
main(sys.argv[1:])
"""

# grad_accum 2 x batch 2 x 2 processes = 8 rows a step; lr high enough that the loss moves visibly.
TRAINING = {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "lr": 5e-3, "log_every": 1, "save_every": 2,
            "keep_checkpoints": 1}


def test_fsdp_trains_like_ddp_writes_one_full_adapter_and_resumes(make_recipe, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ddp = make_recipe(name="ddp", training=TRAINING)
    assert (result := finetune(ddp, "--processes", "2")).exit_code == 0, result.output

    # FSDP run, killed after checkpoint-4: the checkpoint must be one lorachat counts as complete (rotation
    # kept only the newest), then --resume finishes the run.
    fsdp = make_recipe(name="fsdp", training={**TRAINING, "distributed": "fsdp"})
    script = tmp_path / "die_after_step.py"
    script.write_text(DIE_AFTER_STEP)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIE_AT": "4"}
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(script), "finetune", str(fsdp)], env=env, capture_output=True, text=True, timeout=180)
    assert killed.returncode != 0
    out = out_dir(fsdp)
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-4"], killed.stderr[-3000:]
    # Written only by accelerate's FSDP saver: the run really was sharded, not DDP under another name.
    assert (out / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp.bin").is_file()
    assert not (out / "manifest.json").exists()
    assert (result := finetune(fsdp, "--resume", "--processes", "2")).exit_code == 0, result.output

    # Each step logged once, by rank 0 only (the log was truncated back to the checkpoint on resume).
    assert [r["step"] for r in log_lines(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp", "fsdp"], "one adapter per run, no leftovers"

    # Same rows per step, same loss normalisation (FSDP2, like DDP, averages gradients over ranks): the runs
    # differ only in how the two ranks' float32 gradients are summed (reduce-scatter of shards vs all-reduce
    # of buckets), i.e. rounding at ~1e-7 relative, which six Adam steps cannot grow anywhere near 1e-5.
    expected, got = losses(out_dir(ddp)), losses(out)
    assert expected[6] < expected[1] - 0.05, "the comparison is only meaningful if training moved the loss"
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step

    # The adapter holds the full (gathered) LoRA tensors, not one rank's shard, and loads with plain PEFT.
    want, have = load_file(out_dir(ddp) / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(have) == sorted(want) and any("lora_A" in k for k in have)
    for key, tensor in have.items():
        assert tensor.shape == want[key].shape, key
        torch.testing.assert_close(tensor, want[key], rtol=1e-4, atol=1e-5)
    assert all(have[k].abs().sum() > 0 for k in have if "lora_B" in k), "lora_B starts at zero: it trained"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.shape == (model.peft_config["default"].r, q.in_features)
