"""`lorachat plan`: will a recipe's run fit a GPU, and how long will it take, before anything is downloaded.

The 7B model here is only its config.json (Llama-2-7B's published sizes) in a folder: no tokenizer, no weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from lora_chat.cli import main
from lora_chat.plan import Setup, Shape, estimate
from lora_chat.plan.memory import LINEARS, loss_chunk_rows
from lora_chat.recipe import cuda_only_problems, load_recipe
from tests.conftest import sample_rows, write_jsonl

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "num_hidden_layers": 32, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}


@pytest.fixture
def config_only_recipe(tmp_path):
    """A recipe whose base is a folder holding only Llama-2-7B's config.json."""
    base = tmp_path / "llama-2-7b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(LLAMA2_7B), encoding="utf-8")
    write_jsonl(tmp_path / "train.jsonl", sample_rows(40))

    def make(**training) -> Path:
        recipe = {"name": "big", "base": {"model": str(base), "dtype": "bfloat16"},
                  "data": {"train": [{"path": "train.jsonl"}], "max_length": 2048},
                  "training": {"batch_size": 1, "grad_accum": 8, **training}}
        path = tmp_path / "big.yaml"
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        return path

    return make


def plan_json(*args: str) -> tuple[int, dict | str]:
    result = CliRunner().invoke(main, ["plan", *args, "--json"])
    if result.exit_code:
        return result.exit_code, result.output
    return 0, json.loads(result.output)


def test_a_model_known_only_by_its_config_gets_a_plan(config_only_recipe):
    code, plan = plan_json(str(config_only_recipe()), "--gpu", "rtx-4090")
    assert code == 0, plan
    assert plan["gpu"] == "RTX 4090" and plan["fits"] is True
    assert 13 < plan["peak_memory_gib"] < 24  # 7B in bf16 is 12.6 GiB of weights alone
    assert plan["breakdown"]["weights"] == pytest.approx(6.74e9 * 2 / 2**30, rel=0.02)
    assert "characters per token" in plan["lengths_from"]  # no tokenizer beside config.json, and it says so
    assert plan["tokens_per_s"] > 0 and plan["hours"] > 0 and plan["steps"] == 5  # 40 rows / 8 per step
    assert plan["suggestions"] == []


def test_a_run_too_big_for_the_card_comes_with_changes_that_fit(config_only_recipe):
    code, plan = plan_json(str(config_only_recipe(batch_size=8)), "--set", "data.max_length=4096",
                           "--set", "training.packing=true", "--set", "training.gradient_checkpointing=false",
                           "--gpu", "RTX 3090")
    assert code == 0, plan
    assert plan["fits"] is False and plan["peak_memory_gib"] > 24
    assert plan["suggestions"], "a 7B LoRA run can always be made to fit 24 GB"
    for suggestion in plan["suggestions"]:
        assert suggestion["fits"] and suggestion["peak_memory_gib"] <= 24.0
        assert "=" in suggestion["change"]  # something to pass to --set


def test_without_gpu_the_smallest_card_that_fits_is_chosen(config_only_recipe):
    code, plan = plan_json(str(config_only_recipe()), "--set", "base.quantization=4bit")
    assert code == 0, plan
    fitting = [g for g in plan["gpus"] if g["fits"]]
    assert plan["fits"] and plan["gpu_memory_gib"] == min(g["memory_gib"] for g in fitting)


def test_unknown_gpu_is_one_line_with_did_you_mean(config_only_recipe):
    result = CliRunner().invoke(main, ["plan", str(config_only_recipe()), "--gpu", "A100-80"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "unknown GPU 'A100-80'; did you mean 'A100 80GB'?" in result.output


def test_base_folder_without_config_json_is_one_line(tmp_path):
    (tmp_path / "empty-model").mkdir()
    write_jsonl(tmp_path / "train.jsonl", sample_rows(4))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "x", "base": {"model": str(tmp_path / "empty-model")},
                                      "data": {"train": [{"path": "train.jsonl"}]}}), encoding="utf-8")
    result = CliRunner().invoke(main, ["plan", str(recipe)])
    assert result.exit_code == 2
    assert "has no config.json" in result.output and result.output.strip().count("\n") == 0


def test_with_a_tokenizer_lengths_are_measured_as_validate_does(make_recipe):
    code, plan = plan_json(str(make_recipe()), "--gpu", "L4")
    assert code == 0, plan
    assert plan["lengths_from"].startswith("measured with the base's tokenizer")
    assert 0 < plan["trained_tokens"] < plan["tokens"]


def test_readable_table_without_json(config_only_recipe):
    result = CliRunner().invoke(main, ["plan", str(config_only_recipe()), "--gpu", "H100"])
    assert result.exit_code == 0, result.output
    for words in ("peak GPU memory", "weights", "activations", "optimizer steps", "tokens/s", "H200"):
        assert words in result.output


# ---------------------------------------------------------------- the memory model's moving parts


def _setup(**changes) -> Setup:
    base = Setup(compute_bytes=2, quantization="none", rank=16, targets=LINEARS, variant="lora", dropout=0.05,
                 optimizer="adamw", batch=4, seq_len=2048, trained_share=0.6, checkpointing=False, packing=False)
    return base.changed(**changes)


SHAPE = Shape.from_config(LLAMA2_7B, None)


def test_quantization_shrinks_the_weights_as_nf4_and_int8_do():
    full, int8, nf4 = (estimate(SHAPE, _setup(quantization=q)).weights for q in ("none", "8bit", "4bit"))
    assert nf4 < int8 < full
    linear = SHAPE.layers * SHAPE.layer_linear_params()
    # nf4 with double quantization: 0.5 + 1/64 + 4/16384 bytes a weight, plus embeddings and head in the compute
    # dtype (lorachat does not upcast them; peft's prepare_model_for_kbit_training would, to fp32)
    assert nf4 == pytest.approx(linear * 0.51587 + SHAPE.embedding_params * 2, rel=0.001)
    upcast = estimate(SHAPE, _setup(quantization="4bit", kbit_upcast=True)).weights
    assert upcast - nf4 == pytest.approx(SHAPE.embedding_params * 2, rel=0.01)


def test_each_memory_setting_lowers_its_own_part():
    plain = estimate(SHAPE, _setup())
    assert estimate(SHAPE, _setup(checkpointing=True)).activations < plain.activations / 5
    assert estimate(SHAPE, _setup(optimizer="adamw_8bit")).optimizer < plain.optimizer / 3
    assert estimate(SHAPE, _setup(loss_chunk=None)).logits > plain.logits  # lorachat's chunked loss
    assert estimate(SHAPE, _setup(kernels="liger")).activations < plain.activations
    assert estimate(SHAPE, _setup(rank=8)).optimizer == plain.optimizer // 2
    assert estimate(SHAPE, _setup(seq_len=1024)).total < plain.total


def test_a_cpu_estimate_counts_the_freed_blocks_glibc_keeps():
    """A CPU run's RSS was 1.7-2.9x its tensors (glibc's heap keeps a step's freed blocks); plan read 47-63% low."""
    from lora_chat.plan.memory import CPU_HEAP_KEPT

    for checkpointing in (False, True):
        gpu, cpu = (estimate(SHAPE, _setup(checkpointing=checkpointing, device=d)) for d in ("cuda", "cpu"))
        transient = cpu.activations + max(cpu.logits, cpu.backward)
        assert cpu.cuda_context == 0 and cpu.allocator == int(CPU_HEAP_KEPT[checkpointing] * transient)
        assert cpu.total - cpu.allocator == gpu.total - gpu.allocator - gpu.cuda_context  # the same tensors
    assert CPU_HEAP_KEPT[True] > CPU_HEAP_KEPT[False]  # each layer's forward runs twice, in blocks of other sizes


def test_plan_counts_the_loss_chunk_the_trainer_uses(monkeypatch):
    """The chunk used to be 1024 rows whatever the vocabulary: 1 GiB of logits buffers at Llama 3's 128k."""
    from lora_chat.train import loss

    seen = []
    real = loss._ChunkedCrossEntropy.apply
    monkeypatch.setattr(loss._ChunkedCrossEntropy, "apply", lambda *a: seen.append(a[-1]) or real(*a))
    for vocab, rows in ((32000, 256), (49152, 128), (128256, 64), (100, 1024)):
        assert loss_chunk_rows(vocab) == rows
        loss.chunked_cross_entropy(torch.zeros(3, 8), torch.zeros(vocab, 8), torch.zeros(3, dtype=torch.long))
        assert seen[-1] == rows


def test_chunked_loss_matches_full_cross_entropy_and_its_gradients():
    from lora_chat.train.loss import chunked_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(100, 16, requires_grad=True)
    targets = torch.randint(0, 100, (37,))
    (F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum") * 0.5).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = chunked_cross_entropy(hidden, weight, targets, chunk=8)
    (loss * 0.5).backward()
    assert loss.item() == pytest.approx(F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum").item())
    assert torch.allclose(hidden.grad, expected[0], atol=1e-5) and torch.allclose(weight.grad, expected[1], atol=1e-5)


def _peak_allocated_bytes(fn) -> int:
    """The most bytes `fn`'s CPU allocations held at once, from the profiler's allocation and free events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:  # nbytes: + for an allocation, - for a free
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_chunked_loss_holds_one_chunk_at_a_time():
    """plan counts one chunk's buffers; the loop used to keep the last chunk's beside the next one's (1.5x)."""
    from lora_chat.train.loss import chunked_cross_entropy

    torch.manual_seed(0)
    weight, chunk = torch.randn(4096, 64, dtype=torch.bfloat16), 32

    def peak(rows: int) -> int:
        hidden = torch.randn(rows, 64, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, 4096, (rows,))
        return _peak_allocated_bytes(lambda: chunked_cross_entropy(hidden, weight, targets, chunk=chunk))

    assert peak(8 * chunk) <= 1.1 * peak(chunk)


def test_flash_attention_and_liger_are_refused_without_cuda(make_recipe):
    recipe = make_recipe(base={"attn_implementation": "flash_attention_2"}, training={"kernels": "liger"})
    problems = [str(p) for p in cuda_only_problems(load_recipe(recipe), cuda=False)]
    assert len(problems) == 2
    assert "base.attn_implementation: flash_attention_2 runs only on CUDA GPUs" in problems[0]
    assert "training.kernels: liger kernels are Triton GPU kernels and need CUDA" in problems[1]
    assert cuda_only_problems(load_recipe(recipe), cuda=True) == []


def test_auto_checkpointing_is_off_on_the_cards_the_run_fits_without_it(config_only_recipe):
    # 7B in bf16 with 2 packed rows of 4096 tokens: ~50 GB of activations without checkpointing.
    recipe = str(config_only_recipe(batch_size=2, packing=True))
    code, plan = plan_json(recipe, "--set", "data.max_length=4096", "--gpu", "H200")
    assert code == 0, plan
    cards = {card["name"]: card for card in plan["gpus"]}
    assert cards["RTX 4090"]["gradient_checkpointing"] is True and cards["RTX 4090"]["fits"]
    assert cards["H200"]["gradient_checkpointing"] is False
    assert plan["gradient_checkpointing"] == {"setting": "auto", "on": False, "offload": False}
    assert plan["peak_memory_gib"] <= 0.8 * plan["gpu_memory_gib"]  # the headroom auto keeps
    _, forced = plan_json(recipe, "--set", "data.max_length=4096", "--gpu", "H200",
                          "--set", "training.gradient_checkpointing=true")
    assert forced["gradient_checkpointing"] == {"setting": True, "on": True, "offload": False}
    assert plan["tokens_per_s"] > 1.2 * forced["tokens_per_s"]  # no layer recomputed
