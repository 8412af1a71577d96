"""On a CUDA card: what tests/test_memory.py and tests/test_plan.py can only pretend on a CPU.

Every test here is marked `gpu` and skipped where torch sees no CUDA device, as on CI. scripts/gpu-check.sh runs
them (`pytest -m gpu`) on a lent GPU machine, before bench/gpu_check.py records the figures. Runs whose peak memory
is measured, or that patch transformers' modules (Liger), go through `lorachat finetune` in a process of their own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from lora_chat.cli import main
from tests.conftest import build_tiny_base, sample_rows, write_jsonl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs CUDA: CI has no GPU; scripts/gpu-check.sh runs these")]

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
PLAN_TOLERANCE = 0.25  # docs/plan.md: the estimate is within 25% of measured runs


@pytest.fixture(scope="module")
def smollm2_random(tmp_path_factory) -> Path:
    """SmolLM2-135M's architecture and tokenizer (recipes/models/smollm2-135m) with random weights: the memory of
    the real model, which is too large to bring to a GPU machine."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-random"
    shutil.copytree(ROOT / "recipes" / "models" / "smollm2-135m", folder)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=torch.bfloat16).save_pretrained(
        str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_base_64(tmp_path_factory) -> Path:
    """The tiny random chat model, 64 wide (head size 16, as Triton and flash-attention kernels take)."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny-64"), hidden_size=64)


def finetune_in_own_process(recipe: Path) -> dict:
    """`lorachat finetune RECIPE` in a fresh Python, so its peak memory and any patched modules are its own; the
    train section of the adapter's metrics.json."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "lora_chat.cli", "finetune", str(recipe)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = Path(yaml.safe_load(recipe.read_text(encoding="utf-8"))["output"]["dir"])
    return json.loads((output / "metrics.json").read_text(encoding="utf-8"))["train"]


def test_a_qlora_run_peaks_within_a_quarter_of_what_plan_said(make_recipe, smollm2_random):
    """The user plans a QLoRA run, trains it, and finds metrics.json's peak reserved memory where plan put it."""
    recipe = make_recipe(rows=sample_rows(200), base={"model": str(smollm2_random), "dtype": "bfloat16",
                                                      "quantization": "4bit"},
                         data={"max_length": 512}, lora={"r": 16, "alpha": 32, "target_modules": "all-linear"},
                         training={"batch_size": 1, "grad_accum": 2, "max_steps": 4, "packing": True,
                                   "gradient_checkpointing": False})
    planned = CliRunner().invoke(main, ["plan", str(recipe), "--json"])
    assert planned.exit_code == 0, planned.output
    estimate = json.loads(planned.output)["reserved_gib"]

    peak = finetune_in_own_process(recipe)["peak_memory"]

    assert peak["device"] == "cuda" and 0 < peak["max_allocated_bytes"] <= peak["max_reserved_bytes"]
    measured = peak["max_reserved_bytes"] / GIB
    assert abs(estimate / measured - 1) <= PLAN_TOLERANCE, f"plan {estimate:.3f} GiB, measured {measured:.3f} GiB"


def test_the_chunked_loss_equals_the_plain_loss_and_its_gradients_on_cuda():
    """In fp32, at SmolLM2's vocabulary: 300 trained positions, so two full chunks and a partial one."""
    from lora_chat.train.loss import chunked_cross_entropy

    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 576, device="cuda", generator=generator, requires_grad=True)
    weight = (0.02 * torch.randn(49152, 576, device="cuda", generator=generator)).requires_grad_()
    targets = torch.randint(0, 49152, (300,), device="cuda", generator=generator)
    plain = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    plain.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    chunked = chunked_cross_entropy(hidden, weight, targets)
    chunked.backward()

    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.allclose(hidden.grad, expected[0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(weight.grad, expected[1], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_kernels_train_to_the_same_loss(make_recipe, tiny_base_64):
    losses = {}
    for kernels in ("none", "liger"):
        recipe = make_recipe(name=f"kernels-{kernels}", base={"model": str(tiny_base_64)},
                             training={"kernels": kernels, "max_steps": 3})
        losses[kernels] = finetune_in_own_process(recipe)["loss"]
    assert losses["liger"] == pytest.approx(losses["none"], rel=1e-3)


def test_offloaded_checkpointing_trains_on_cuda(make_recipe, tiny_base_64):
    recipe = make_recipe(base={"model": str(tiny_base_64), "dtype": "bfloat16"},
                         training={"gradient_checkpointing": "offload", "max_steps": 2})
    result = CliRunner().invoke(main, ["finetune", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "gradient checkpointing offloaded to host memory" in result.output
    metrics = json.loads((recipe.parent / "adapters" / "test-run" / "metrics.json").read_text())
    assert metrics["train"]["gradient_checkpointing"] is True and metrics["train"]["peak_memory"]["device"] == "cuda"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_trains_packed_rows_to_the_same_loss_as_sdpa(make_recipe, tiny_base_64):
    losses = {}
    for attention in ("sdpa", "flash_attention_2"):
        recipe = make_recipe(name=f"attention-{attention}",
                             base={"model": str(tiny_base_64), "dtype": "bfloat16", "attn_implementation": attention},
                             training={"packing": True, "max_steps": 3})
        result = CliRunner().invoke(main, ["finetune", str(recipe)])
        assert result.exit_code == 0, result.output
        metrics = json.loads((recipe.parent / "adapters" / recipe.stem / "metrics.json").read_text())
        losses[attention] = metrics["train"]["loss"]
    assert losses["flash_attention_2"] == pytest.approx(losses["sdpa"], rel=2e-2)
