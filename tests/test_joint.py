"""`lorachat finetune a.yaml b.yaml`: several adapters trained in one run on one loaded base, on the tiny model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import chat, sample_rows, write_jsonl
from safetensors.torch import load_file
from train_helpers import finetune, losses, out_dir, slowed_cli

from lora_chat.cli import main

SWEDISH = [chat(f"Hej {i}, hur lång tid tar ett bygglov?", f"Svar {i}: handläggningstiden är tio veckor. " * (1 + i % 3))
           for i in range(20)]


@pytest.fixture
def recipes(tmp_path, tiny_base):
    """Write a recipe with its own data file; keyword sections override the defaults."""

    def make(name: str, rows: list | None = None, **sections) -> Path:
        write_jsonl(tmp_path / f"{name}.jsonl", rows if rows is not None else sample_rows())
        recipe = {
            "name": name,
            "base": {"model": str(tiny_base), "dtype": "float32"},
            "data": {"train": [{"path": f"{name}.jsonl"}], "max_length": 128},
            "training": {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "log_every": 1},
            "output": {"dir": str(tmp_path / "adapters" / name)},
        }
        for section, values in sections.items():
            recipe[section] = {**recipe.get(section, {}), **values}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return path

    return make


def weights(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter / "adapter_model.safetensors"))


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


# ---------------------------------------------------------------- the adapters


def test_each_joint_adapter_equals_the_same_recipe_trained_alone(recipes):
    """Different data, rank, targets, lr, schedule, batch, steps and seed per adapter; the adapters a joint run
    writes hold the weights, config and files the single runs write."""
    en = recipes("en", training={"max_steps": 5, "scheduler": "linear"})
    sv = recipes("sv", SWEDISH, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                 training={"lr": 5e-3, "seed": 7, "batch_size": 3, "max_steps": 3, "epochs": None})
    alone = [recipes(f"{name}-alone", rows, lora=lora, training=training)
             for name, rows, lora, training in (
                 ("en", None, {}, {"max_steps": 5, "scheduler": "linear"}),
                 ("sv", SWEDISH, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                  {"lr": 5e-3, "seed": 7, "batch_size": 3, "max_steps": 3}))]
    for recipe in alone:
        assert finetune(recipe).exit_code == 0
    result = finetune(en, sv)
    assert result.exit_code == 0, result.output
    for joint, single in zip((en, sv), alone):
        assert max_difference(out_dir(joint), out_dir(single)) <= 1e-5
        assert sorted(p.name for p in out_dir(joint).iterdir()) == sorted(p.name for p in out_dir(single).iterdir())
        config = json.loads((out_dir(joint) / "adapter_config.json").read_text())
        assert config == json.loads((out_dir(single) / "adapter_config.json").read_text())
        assert losses(out_dir(joint)) == pytest.approx(losses(out_dir(single)), abs=1e-6)
        metrics = json.loads((out_dir(joint) / "metrics.json").read_text())
        assert metrics["train"]["steps"] == json.loads((out_dir(single) / "metrics.json").read_text())["train"]["steps"]
        assert metrics["eval"]["loss"] == pytest.approx(
            json.loads((out_dir(single) / "metrics.json").read_text())["eval"]["loss"], abs=1e-5)
    assert CliRunner().invoke(main, ["adapters", "verify", str(out_dir(sv))]).exit_code == 0


def test_gradients_of_a_row_reach_only_its_own_adapter(tiny_base):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_chat.train.joint.layer import route, use_mixed_forward
    from lora_chat.train.run import lora_config
    from lora_chat.recipe import Lora

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_base)), lora_config(Lora()))
    model.add_adapter("other", lora_config(Lora(r=4, alpha=8)))
    use_mixed_forward(model, ["default", "other"])
    for name, p in model.named_parameters():  # B starts at zero, which would hide A's gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with route(["default", "other"]):
        logits = model(input_ids=ids).logits  # (2, 4, V)
        logits[0].sum().backward()  # row 0 only: it belongs to "default"
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".default." in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".other." in n)
    # and each row's output is what its adapter alone gives it
    with torch.no_grad(), route(["other", "other"]):
        both = model(input_ids=ids).logits
    with torch.no_grad(), route(["default", "other"]):
        mixed = model(input_ids=ids).logits
    assert torch.allclose(mixed[1], both[1], atol=1e-6) and not torch.allclose(mixed[0], both[0], atol=1e-4)


def _saved_activation_bytes(model, ids, names: list[str] | None = None) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward (routed by `names`, if given)."""
    import contextlib

    from lora_chat.train.joint.layer import route

    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            (route(names) if names else contextlib.nullcontext()):
        model(input_ids=ids, use_cache=False)
    return sum(storages.values())


def test_a_mixed_micro_batch_keeps_the_activations_of_one_adapters_batch(tiny_base):
    """Four adapters sharing a micro-batch save what PEFT's own forward saves for one adapter on the same rows (no
    per-adapter copies of the layers' inputs or outputs): a joint run's memory is one run's plus the adapters'."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_chat.train.joint.layer import use_mixed_forward
    from lora_chat.train.run import lora_config
    from lora_chat.recipe import Lora

    def model_with(names):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_base)), lora_config(Lora(r=4, alpha=8)))
        for name in names[1:]:
            model.add_adapter(name, lora_config(Lora(r=4, alpha=8)))
        return model.train()

    ids = torch.randint(0, 100, (4, 256))
    alone = _saved_activation_bytes(model_with(["default"]), ids)
    names = ["default", "b", "c", "d"]
    joint = model_with(names)
    use_mixed_forward(joint, names)
    mixed = _saved_activation_bytes(joint, ids, names)
    assert mixed <= 1.05 * alone, (mixed, alone)


def test_progress_shows_a_line_per_adapter_and_the_runs_tokens_per_second(recipes):
    result = finetune(recipes("en"), recipes("sv", SWEDISH))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for step in range(1, 5):
        assert any(line.startswith(f"en {step}/4 ") and "loss" in line for line in lines)
        assert any(line.startswith(f"sv {step}/4 ") and "tok/s" in line for line in lines)
    last = [line for line in lines if line.startswith("all adapters 4/4")]
    assert last and "adapters 0/2 training" in last[-1] and "tok/s" in last[-1]


# ---------------------------------------------------------------- refusals: exit 2, one line, nothing written


@pytest.mark.parametrize("case, expected", [
    ("dtype", r"sv\.yaml:4: base\.dtype: bfloat16 differs from float32 in \S+en\.yaml"),
    ("quantization", r"sv\.yaml:5: base\.quantization: 4bit differs from none in \S+en\.yaml"),
    ("same output", r"sv\.yaml:\d+: output\.dir: \S+ is also the output\.dir of \S+en\.yaml"),
    ("same recipe", r"en\.yaml: the same recipe is given twice"),
    ("no usable row", r"sv\.yaml:\d+: data\.train: every training row was dropped"),
    ("eval split", r"sv\.yaml:\d+: data\.eval: no eval rows, while \S+en\.yaml has 2"),
])
def test_recipes_that_cannot_train_together_are_refused_before_anything_loads(recipes, tmp_path, case, expected):
    en = recipes("en")
    sv = {"dtype": lambda: recipes("sv", base={"dtype": "bfloat16"}),
          "quantization": lambda: recipes("sv", base={"quantization": "4bit"}),
          "same output": lambda: recipes("sv", output={"dir": str(out_dir(en))}),
          "same recipe": lambda: en,
          "no usable row": lambda: recipes("sv", data={"max_length": 16}),
          "eval split": lambda: recipes("sv", data={"eval": {"split": 0}}),
          }[case]()
    result = finetune(en, sv)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), result.output
    assert not (tmp_path / "adapters").exists()


def test_resume_is_refused_when_one_adapter_has_no_checkpoint(recipes):
    en, sv = recipes("en", training={"lr": 1e9, "max_grad_norm": 1e9, "save_every": 1}), recipes("sv", SWEDISH)
    assert finetune(en).exit_code == 1  # a NaN at step 4: en's checkpoints stay, to resume from
    before = sorted(p.name for p in out_dir(en).rglob("*"))
    result = finetune(en, sv, "--resume")
    assert result.exit_code == 2
    assert re.search(r"sv\.yaml:\d+: output\.dir: --resume: no complete checkpoint under", result.output)
    assert sorted(p.name for p in out_dir(en).rglob("*")) == before and not out_dir(sv).exists()


# ---------------------------------------------------------------- NaN, kill -9


def test_a_nan_in_one_adapter_stops_only_that_one_and_says_which(recipes):
    en = recipes("en")
    sv = recipes("sv", SWEDISH, training={"lr": 1e9, "max_grad_norm": 1e9, "save_every": 1})
    result = finetune(en, sv)
    assert result.exit_code == 1, result.output
    assert "sv: loss became" in result.output and "stopped this adapter" in result.output
    assert "(1 of 2 adapters written)" in result.output
    assert (out_dir(en) / "manifest.json").exists() and not (out_dir(sv) / "manifest.json").exists()
    assert "last good checkpoint: " in result.output and "checkpoint-3 " in result.output
    assert (out_dir(sv) / "checkpoints" / "checkpoint-3" / "optimizer.pt").exists()


def test_a_nan_stops_the_whole_run_when_its_recipe_says_so(recipes):
    en = recipes("en")
    sv = recipes("sv", SWEDISH, training={"lr": 1e9, "max_grad_norm": 1e9, "on_nan": "run"})
    result = finetune(en, sv)
    assert result.exit_code == 1
    assert "sv: loss became" in result.output and "stopped the run (training.on_nan: run)" in result.output
    assert not (out_dir(en) / "manifest.json").exists() and not (out_dir(sv) / "manifest.json").exists()


SLOW_STEPS = slowed_cli("lora_chat.train.joint.loop", "JointTrainer", "train_step", 0.3)


def test_resume_after_kill_9_resumes_every_adapter_exactly(recipes):
    """The adapters checkpoint at different steps (every 3 and every 4); after kill -9 each resumes from its own."""
    training = {"max_steps": 10, "lr": 5e-3, "keep_checkpoints": 3}
    whole = [recipes("en-whole", training={**training, "save_every": 3}),
             recipes("sv-whole", SWEDISH, training={**training, "save_every": 4})]
    assert finetune(*whole).exit_code == 0
    cut = [recipes("en", training={**training, "save_every": 3}),
           recipes("sv", SWEDISH, training={**training, "save_every": 4})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, "finetune", *map(str, cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.time() + 120
    while not (out_dir(cut[0]) / "checkpoints" / "checkpoint-6").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < end
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not any((out_dir(r) / "manifest.json").exists() for r in cut)
    assert (out_dir(cut[1]) / "checkpoints" / "checkpoint-4").exists()
    result = finetune(*cut, "--resume")
    assert result.exit_code == 0, result.output
    for single, resumed in zip(whole, cut):
        expected, got = losses(out_dir(single)), losses(out_dir(resumed))
        assert sorted(got) == list(range(1, 11))
        assert got == pytest.approx(expected, abs=1e-5)
        assert max_difference(out_dir(single), out_dir(resumed)) <= 1e-5


# ---------------------------------------------------------------- plan


def test_plan_estimates_the_joint_run_of_several_recipes(recipes):
    en, sv = recipes("en"), recipes("sv", SWEDISH, lora={"r": 32}, training={"batch_size": 4})
    result = CliRunner().invoke(main, ["plan", str(en), str(sv), "--gpu", "RTX 4090", "--json"])
    assert result.exit_code == 0, result.output
    joint = json.loads(result.output)
    singles = [json.loads(CliRunner().invoke(main, ["plan", str(r), "--gpu", "RTX 4090", "--json"]).output)
               for r in (en, sv)]
    assert [a["recipe"] for a in joint["adapters"]] == [str(en), str(sv)]
    parts, one = joint["breakdown"], [s["breakdown"] for s in singles]
    assert parts["weights"] == one[0]["weights"]  # the base once
    assert parts["adapter"] == pytest.approx(one[0]["adapter"] + one[1]["adapter"], abs=2e-3)
    assert parts["optimizer"] == pytest.approx(one[0]["optimizer"] + one[1]["optimizer"], abs=2e-3)
    assert joint["micro_batch"]["rows"] == 4  # the largest batch_size: rows of both adapters mixed
    assert joint["steps"] == max(s["steps"] for s in singles)
    assert joint["hours"] == pytest.approx(sum(s["hours"] for s in singles), rel=0.05)


# ---------------------------------------------------------------- several processes


def test_processes_2_trains_the_same_adapters_as_one_process_with_the_same_rows_per_step(recipes):
    """Under --processes N each optimizer step takes batch_size x grad_accum x N rows, as a single run's DDP does;
    one process with twice the batch_size trains the same rows in each step."""
    two = [recipes("en", training={"max_steps": 3}), recipes("sv", SWEDISH, training={"max_steps": 3, "lr": 5e-3})]
    one = [recipes("en-one", training={"max_steps": 3, "batch_size": 4}),
           recipes("sv-one", SWEDISH, training={"max_steps": 3, "lr": 5e-3, "batch_size": 4})]
    assert finetune(*one).exit_code == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lora_chat.cli", "finetune", *map(str, two), "--processes", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("all adapters 3/3") == 1  # rank 0 alone shows progress
    for a, b in zip(two, one):
        assert max_difference(out_dir(a), out_dir(b)) <= 1e-5
        assert losses(out_dir(a)) == pytest.approx(losses(out_dir(b)), abs=1e-5)
