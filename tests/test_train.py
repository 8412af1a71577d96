"""`lorachat finetune` on the tiny model: adapter contents, packing maths, resume, signals, faults, DDP."""

from __future__ import annotations

import errno
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
from train_helpers import finetune, log_lines, losses, out_dir, slowed_cli

SLOW_STEPS = slowed_cli("lora_chat.train.trainer", "LorachatTrainer", "training_step", 0.25)


def start_slow(recipe: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_STEPS, "finetune", str(recipe), *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


# ---------------------------------------------------------------- the adapter


def test_adapter_directory_is_complete_and_loads_with_plain_peft(make_recipe, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_chat.adapters import read_adapter, verify

    recipe = make_recipe()
    result = finetune(recipe)
    assert result.exit_code == 0, result.output
    out = out_dir(recipe)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
            "recipe.yaml", "metrics.json", "train_log.jsonl", "README.md", "manifest.json"} <= names
    assert not [n for n in out.parent.iterdir() if n.name.startswith(".")], "no temp folders left"
    assert verify(out) == []
    info = read_adapter(out)
    assert info.name == out.name and info.base_model == str(tiny_base)
    source = info.manifest["inputs"]["data"]["sources"][0]
    assert len(source["sha256"]) == 64
    assert info.manifest["base"]["num_hidden_layers"] == 2
    assert set(info.manifest["versions"]) >= {"lorachat", "peft", "transformers", "torch"}
    card = (out / "README.md").read_text()
    assert "base_model_relation: adapter" in card and "library_name: peft" in card
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    assert model.peft_config["default"].r == 16
    assert [r["step"] for r in log_lines(out) if "loss" in r] == [1, 2, 3, 4]
    assert {"loss", "lr", "tokens_per_s"} <= set(log_lines(out)[0])


def test_loss_goes_down(make_recipe):
    recipe = make_recipe(training={"max_steps": 12, "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "log_every": 1,
                                   "scheduler": "constant", "warmup_ratio": 0.0})
    assert finetune(recipe).exit_code == 0
    seen = losses(out_dir(recipe))
    assert seen[12] < seen[1] - 0.3


def test_dry_run_prints_plan_and_writes_nothing(make_recipe):
    recipe = make_recipe()
    result = finetune(recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    for word in ("base", "trainable", "tokens", "steps", "epochs"):
        assert word in result.output
    assert not out_dir(recipe).exists()


def test_progress_lines_when_output_is_not_a_terminal(make_recipe):
    """Old behaviour: nothing at all was printed while training into a log file or a pipe."""
    recipe = make_recipe(training={"max_steps": 4, "batch_size": 2, "grad_accum": 1, "log_every": 2})
    result = finetune(recipe)  # CliRunner's stdout is not a terminal
    assert result.exit_code == 0, result.output
    # (found anywhere in a line: in-process, transformers' own "Loading weights" bar may precede the first one)
    lines = re.findall(r"train \d+/\d+ \(\d+%\)[^\n]*", result.output)
    assert [line.split(" | ")[0] for line in lines] == ["train 2/4 (50%)", "train 4/4 (100%)"], result.output
    fields = dict(part.split(" ", 1) for part in lines[0].split(" | ")[1:])
    assert set(fields) == {"epoch", "loss", "lr", "tok/s", "elapsed", "eta"}
    assert float(fields["loss"]) == pytest.approx(losses(out_dir(recipe))[2], abs=1e-4)
    assert "eta" not in lines[-1]


def test_auto_checkpointing_is_off_when_the_run_fits_without_it_and_says_why(make_recipe, monkeypatch):
    import transformers.modeling_utils as modeling

    calls = _count_checkpointed_layers(monkeypatch, modeling)
    recipe = make_recipe()  # gradient_checkpointing left to its default, auto
    result = finetune(recipe)
    assert result.exit_code == 0, result.output
    assert re.search(r"gradient checkpointing off \(auto: the run needs ~[\d.]+ [GM]iB without it, within 25% of "
                     r"[\d.]+ GiB RAM\)", result.output), result.output
    assert json.loads((out_dir(recipe) / "metrics.json").read_text())["train"]["gradient_checkpointing"] is False
    assert calls == []


def test_auto_checkpointing_is_on_where_the_run_would_not_fit_without_it(make_recipe, monkeypatch):
    import transformers.modeling_utils as modeling

    from lora_chat.train import checkpointing

    # A machine with 2 MiB of RAM, which this one is not: the device's size is the one input auto reads.
    monkeypatch.setattr(checkpointing, "device_memory", lambda: ("cpu", 2 * 2**20))
    calls = _count_checkpointed_layers(monkeypatch, modeling)
    recipe = make_recipe()
    result = finetune(recipe)
    assert result.exit_code == 0, result.output
    assert "gradient checkpointing on (auto: the run needs ~" in result.output, result.output[-600:]
    assert "over 25% of 2.0 MiB RAM" in result.output
    assert json.loads((out_dir(recipe) / "metrics.json").read_text())["train"]["gradient_checkpointing"] is True
    assert calls, "no decoder layer ran under torch's checkpoint"


def test_each_optimizer_step_trains_its_rows_longest_first(make_recipe, monkeypatch):
    from tests.conftest import chat

    from lora_chat.train import collate

    seen, real = [], collate.Collator.__call__

    def spy(self, rows):
        seen.append([len(row["input_ids"]) for row in rows])
        return real(self, rows)

    monkeypatch.setattr(collate.Collator, "__call__", spy)
    rows = [chat(f"Question {i}" + " and more" * (i % 7), f"Answer {i}" + " indeed" * (i * 5 % 11)) for i in range(24)]
    recipe = make_recipe(rows=rows, training={"max_steps": 3, "batch_size": 2, "grad_accum": 3, "log_every": 1})
    assert finetune(recipe).exit_code == 0
    steps = [sum(seen[i:i + 3], []) for i in range(0, 9, 3)]  # 3 micro-batches of 2 rows a step
    assert all(step == sorted(step, reverse=True) for step in steps), steps
    assert len({length for step in steps for length in step}) > 3  # the data did vary in length


def test_the_training_order_is_a_seeded_shuffle_with_every_row_once_an_epoch():
    from lora_chat.train.sampler import StepSortedSampler

    lengths = [(i * 37) % 23 for i in range(20)]
    sampler = StepSortedSampler(lengths, rows_per_step=6, seed=7)
    first = list(sampler)
    assert sorted(first) == list(range(20))
    assert first == list(StepSortedSampler(lengths, rows_per_step=6, seed=7))  # a resumed run sees the same order
    sampler.set_epoch(1)
    assert list(sampler) != first
    # Each step holds the rows the seeded shuffle put there, only reordered: the same update as unsorted.
    shuffled = torch.randperm(20, generator=torch.Generator().manual_seed(7)).tolist()
    assert [set(first[i:i + 6]) for i in range(0, 20, 6)] == [set(shuffled[i:i + 6]) for i in range(0, 20, 6)]
    assert first != shuffled


def _count_checkpointed_layers(monkeypatch, modeling) -> list:
    """Spy on the checkpoint function transformers wraps each decoder layer's call in."""
    calls, real = [], modeling.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "checkpoint", counting)
    return calls


def test_every_adapter_file_gets_its_mode_from_the_umask(make_recipe):
    """Old behaviour: adapter_model.safetensors came out 0600 while the other files were 0644."""
    recipe = make_recipe(training={"max_steps": 1, "batch_size": 2, "grad_accum": 1})
    old = os.umask(0o027)
    try:
        assert finetune(recipe).exit_code == 0
    finally:
        os.umask(old)
    out = out_dir(recipe)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes["adapter_model.safetensors"] == 0o640
    assert set(modes.values()) == {0o640}, modes
    assert out.stat().st_mode & 0o777 == 0o750


# ---------------------------------------------------------------- packing


def test_packed_per_sample_loss_equals_unpacked(tiny_base):
    """No attention across packed samples: each sample's loss is the same alone or packed with others."""
    from transformers import AutoModelForCausalLM

    from lora_chat.templates import IGNORE, Encoded
    from lora_chat.train.collate import Collator, to_rows

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa", dtype=torch.float32)
    samples = [Encoded(ids, [IGNORE] * 3 + ids[3:], None)
               for ids in (torch.randint(3, 300, (n,)).tolist() for n in (17, 9, 30, 5))]
    collate = Collator(pad_id=2)

    def per_sample_losses(rows) -> list[float]:
        batch = collate(rows)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        token_loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["shift_labels"].flatten(), reduction="none").view(batch["input_ids"].shape)
        result = []
        for b, row in enumerate(rows):  # split each row back into its samples by the position-id restarts
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            result += [float(token_loss[b, s:e].sum()) for s, e in zip(starts, starts[1:])
                       if any(t != IGNORE for t in row["targets"][s:e])]
        return sorted(result)

    packed = to_rows(samples, packing=True, max_length=64)
    assert len(packed) < len(samples)
    unpacked = per_sample_losses(to_rows(samples, False, 64))
    assert len(unpacked) == len(samples)
    assert per_sample_losses(packed) == pytest.approx(unpacked, rel=1e-5)


def test_padded_rows_of_one_sample_get_plain_causal_attention_not_a_packed_mask(tiny_base):
    """Old behaviour: pad positions restarted at 0, so every padded batch looked packed to transformers, which
    then built a (B, 1, T, T) block mask instead of letting SDPA run causal without one."""
    from transformers.masking_utils import find_packed_sequence_indices

    from lora_chat.templates import IGNORE, Encoded
    from lora_chat.train.collate import Collator, to_rows

    samples = [Encoded(list(range(3, 3 + n)), [IGNORE] + list(range(4, 3 + n)), None) for n in (17, 9, 30)]
    collate = Collator(pad_id=2)
    unpacked = collate(to_rows(samples, packing=False, max_length=64))
    assert find_packed_sequence_indices(unpacked["position_ids"]) is None
    assert (unpacked["input_ids"] == 2).any()  # the batch was padded
    packed = collate(to_rows(samples, packing=True, max_length=64))
    assert find_packed_sequence_indices(packed["position_ids"]) is not None  # packed rows keep their block mask


# ---------------------------------------------------------------- variants


def test_qlora_trains_lora_on_4bit_layers(make_recipe, monkeypatch):
    """Old test checked only `r == 16` in the written config: it passed whether or not 4-bit layers trained."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from lora_chat.train import run

    built = []
    real = run.build_model
    monkeypatch.setattr(run, "build_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    recipe = make_recipe(base={"quantization": "4bit", "dtype": "float32"},
                         training={"max_steps": 4, "batch_size": 2, "grad_accum": 1, "log_every": 1, "lr": 5e-3,
                                   "scheduler": "constant", "warmup_ratio": 0.0})
    result = finetune(recipe)
    assert result.exit_code == 0, result.output
    quantized = [m for m in built[0].modules()
                 if isinstance(getattr(m, "base_layer", None), bnb.nn.Linear4bit) and hasattr(m, "lora_A")]
    assert quantized, "LoRA sits on 4-bit linear layers"
    weights = load_file(out_dir(recipe) / "adapter_model.safetensors")
    assert all(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k), "lora_B starts at zero: it trained"
    seen = losses(out_dir(recipe))
    assert seen[4] != pytest.approx(seen[1], abs=1e-4), "the loss moved"


def test_dora_list_targets_modules_to_save_and_checkpointing(make_recipe):
    recipe = make_recipe(lora={"variant": "dora", "target_modules": ["q_proj", "v_proj"],
                               "modules_to_save": ["norm"]},
                         training={"max_steps": 2, "batch_size": 2, "grad_accum": 2, "log_every": 1,
                                   "gradient_checkpointing": True, "eval_every": 1, "optimizer": "sgd",
                                   "scheduler": "linear"})
    result = finetune(recipe)
    assert result.exit_code == 0, result.output
    config = json.loads((out_dir(recipe) / "adapter_config.json").read_text())
    assert config["use_dora"] and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert config["modules_to_save"] == ["norm"]
    assert [r["step"] for r in log_lines(out_dir(recipe)) if "eval_loss" in r] == [1, 2]


def test_adafactor_trains(make_recipe):
    recipe = make_recipe(training={"max_steps": 6, "batch_size": 4, "grad_accum": 1, "lr": 1e-2, "log_every": 1,
                                   "optimizer": "adafactor", "scheduler": "constant", "warmup_ratio": 0.0})
    result = finetune(recipe)
    assert result.exit_code == 0, result.output
    seen = losses(out_dir(recipe))
    assert seen[6] < seen[1] - 0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU adamw_8bit is accepted")
def test_adamw_8bit_is_refused_on_cpu_before_the_model_loads(make_recipe, monkeypatch):
    from lora_chat.train import run

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run, "build_model", no_loading)
    recipe = make_recipe(training={"optimizer": "adamw_8bit"})
    result = finetune(recipe)
    assert result.exit_code == 2
    assert "training.optimizer: adamw_8bit: bitsandbytes' 8-bit optimizers need a CUDA GPU" in result.output
    assert not out_dir(recipe).exists()


# ---------------------------------------------------------------- bad input and faults


def test_existing_adapter_is_refused_without_overwrite(make_recipe):
    recipe = make_recipe(training={"max_steps": 1, "batch_size": 2, "grad_accum": 1})
    assert finetune(recipe).exit_code == 0
    before = (out_dir(recipe) / "manifest.json").read_bytes()
    result = finetune(recipe)
    assert result.exit_code == 2
    assert "already holds an adapter; use --overwrite" in result.output
    assert (out_dir(recipe) / "manifest.json").read_bytes() == before
    assert finetune(recipe, "--overwrite").exit_code == 0


def test_overwrite_keeps_the_old_adapter_until_the_new_one_is_published(make_recipe, monkeypatch):
    """Old behaviour: --overwrite deleted the old adapter at start, so a failed run lost it."""
    from lora_chat.train import run

    recipe = make_recipe(training={"max_steps": 1, "batch_size": 2, "grad_accum": 1})
    assert finetune(recipe).exit_code == 0
    before = (out_dir(recipe) / "adapter_model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run, "_save_adapter", fail)
    assert finetune(recipe, "--overwrite").exit_code != 0
    previous = out_dir(recipe).parent / f".{out_dir(recipe).name}.previous"
    assert (previous / "adapter_model.safetensors").read_bytes() == before
    monkeypatch.undo()
    assert finetune(recipe, "--overwrite").exit_code == 0
    assert not previous.exists() and (out_dir(recipe) / "manifest.json").is_file()


def test_resume_without_checkpoint_exits_2(make_recipe):
    result = finetune(make_recipe(), "--resume")
    assert result.exit_code == 2
    assert "--resume: no complete checkpoint" in result.output


def test_disk_full_while_saving_keeps_previous_checkpoint(make_recipe, monkeypatch):
    from lora_chat import files

    real = files.fsync_file

    def fsync_or_full(path):
        if ".tmp-checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    monkeypatch.setattr(files, "fsync_file", fsync_or_full)
    recipe = make_recipe(training={"max_steps": 6, "batch_size": 2, "grad_accum": 1, "save_every": 2})
    result = finetune(recipe)
    assert result.exit_code == 1
    assert "cannot save checkpoint-4: disk full; checkpoint-2 is intact" in result.output
    root = out_dir(recipe) / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name != "train_log.jsonl") == ["checkpoint-2"]
    assert not (out_dir(recipe) / "manifest.json").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(make_recipe, monkeypatch):
    from lora_chat.train import trainer

    real = trainer.token_loss_sum
    calls = {"n": 0}

    def nan_after_three(*args):
        loss, count = real(*args)
        calls["n"] += 1
        return (loss * float("nan"), count) if calls["n"] > 3 else (loss, count)

    monkeypatch.setattr(trainer, "token_loss_sum", nan_after_three)
    recipe = make_recipe(training={"max_steps": 6, "batch_size": 2, "grad_accum": 1, "save_every": 2})
    result = finetune(recipe)
    assert result.exit_code == 1
    assert "loss became nan at step 4" in result.output and "checkpoint-2" in result.output
    assert (out_dir(recipe) / "checkpoints" / "checkpoint-2" / "optimizer.pt").exists()
    assert not (out_dir(recipe) / "manifest.json").exists()


# ---------------------------------------------------------------- resume and signals


RESUME_TRAINING = {"max_steps": 12, "batch_size": 2, "grad_accum": 2, "lr": 5e-3, "log_every": 1,
                   "save_every": 3, "keep_checkpoints": 2}


def test_resume_after_kill_9_matches_uninterrupted_run(make_recipe, tmp_path):
    whole = make_recipe(name="whole", training=RESUME_TRAINING)
    assert finetune(whole).exit_code == 0
    cut = make_recipe(name="cut", training=RESUME_TRAINING)
    proc = start_slow(cut)
    wait_for(out_dir(cut) / "checkpoints" / "checkpoint-6", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out_dir(cut) / "manifest.json").exists()
    assert sorted(p.name for p in (out_dir(cut) / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3",
                                                                                          "checkpoint-6"]
    result = finetune(cut, "--resume")
    assert result.exit_code == 0, result.output
    expected, got = losses(out_dir(whole)), losses(out_dir(cut))
    assert sorted(got) == list(range(1, 13))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_sigterm_finishes_step_saves_checkpoint_and_exits_143(make_recipe):
    recipe = make_recipe(training={**RESUME_TRAINING, "save_every": None})
    proc = start_slow(recipe)
    wait_for(out_dir(recipe) / "train_log.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted at step" in err and "--resume" in err
    saved = list((out_dir(recipe) / "checkpoints").glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "optimizer.pt").exists()
    assert not (out_dir(recipe) / "manifest.json").exists()
    assert finetune(recipe, "--resume").exit_code == 0
    assert (out_dir(recipe) / "manifest.json").exists()


def test_second_ctrl_c_aborts_at_once_leaving_nothing_that_looks_whole(make_recipe):
    recipe = make_recipe(training={**RESUME_TRAINING, "save_every": None})
    proc = start_slow(recipe)
    wait_for(out_dir(recipe) / "train_log.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two signals in one instant reach Python as one
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted at step" not in err  # aborted, not the orderly checkpoint-and-stop
    assert not (out_dir(recipe) / "manifest.json").exists()
    from lora_chat.train import checkpoints

    root = out_dir(recipe) / "checkpoints"  # whatever looks like a checkpoint is a complete one
    assert sorted(root.glob("checkpoint-*")) == sorted(p for _, p in checkpoints.complete(root))


# ---------------------------------------------------------------- several processes


NAN_ON_RANK_1 = """
import os, sys
from lora_chat.train import trainer
real = trainer.token_loss_sum
calls = [0]
def nan_on_rank_1(*args):
    loss, count = real(*args)
    calls[0] += 1
    return (loss * float("nan"), count) if os.environ["RANK"] == "1" and calls[0] > 2 else (loss, count)
trainer.token_loss_sum = nan_on_rank_1
from lora_chat.cli import main
main(sys.argv[1:])
"""


def test_accelerate_launch_runs_finetune_unchanged_and_counts_every_rank(make_recipe):
    from lora_chat.preview import preview_samples
    from lora_chat.recipe import load_recipe

    rows = [{"messages": [{"role": "user", "content": "How long does a permit take?"},
                          {"role": "assistant", "content": "Ten weeks."}]}] * 16  # every row the same length
    recipe = make_recipe(rows=rows, training={"max_steps": 3, "batch_size": 2, "grad_accum": 1, "log_every": 1})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "lora_chat.cli", "finetune", str(recipe)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    out = out_dir(recipe)
    logged = [r for r in log_lines(out) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3], "each step logged once, by rank 0"
    assert logged[-1]["epoch"] == pytest.approx(3 * 2 * 2 / 16), "2 processes x 2 rows a step"
    length = len(preview_samples(load_recipe(recipe), limit=1)[0][0].input_ids)
    assert logged[-1]["tokens"] == 3 * 2 * 2 * length, "tokens of both processes"
    assert json.loads((out / "metrics.json").read_text())["train"]["tokens"] == 3 * 2 * 2 * length
    assert done.stdout.count("adapter written to") == 1
    assert (out / "manifest.json").exists() and len(list(out.parent.iterdir())) == 1


def test_nan_on_one_process_stops_every_process_with_the_nan_error(make_recipe, tmp_path):
    """Old behaviour: the rank that saw NaN raised alone; the other waited in the all-reduce until gloo's timeout."""
    recipe = make_recipe(training={"max_steps": 6, "batch_size": 2, "grad_accum": 1, "save_every": 1})
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), "finetune", str(recipe)], env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.count("error: loss became nan at step 3 on process 1 of 2") == 1, done.stderr[-3000:]
    assert time.time() - start < 300, "stopped at once, not at the process group's timeout"
    assert (out_dir(recipe) / "checkpoints" / "checkpoint-2").is_dir()
    assert not (out_dir(recipe) / "manifest.json").exists()


@pytest.mark.real_model
def test_real_smollm2_two_steps(tmp_path, monkeypatch):
    """The quickstart recipe on the bundled SmolLM2 for two steps: loads, trains, writes an adapter."""
    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    result = finetune(recipe, "--set", "training.max_steps=2", "--set", f"output.dir={tmp_path / 'a'}",
                      "--set", "data.eval.max_rows=8")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "manifest.json").exists()


def test_tensorboard_reporting_writes_event_files(make_recipe):
    pytest.importorskip("tensorboard")
    recipe = make_recipe(training={"max_steps": 2, "batch_size": 2, "grad_accum": 1, "log_every": 1,
                                   "report_to": "tensorboard"})
    result = finetune(recipe)
    assert result.exit_code == 0, result.output
    assert list((out_dir(recipe) / "tensorboard").rglob("events.out.tfevents.*"))


def test_gradient_accumulation_gives_the_update_of_one_big_batch(make_recipe):
    """Each micro-batch used to be divided by its own trained tokens (transformers counts a step's tokens only for
    batches with a "labels" key): a step of grad_accum 2 moved SGD's weights ~2x as far as one batch of its rows."""
    from safetensors.torch import load_file

    training = {"max_steps": 2, "optimizer": "sgd", "lr": 0.5, "max_grad_norm": 1e9}
    accumulated = make_recipe(name="accumulated", training={**training, "batch_size": 2, "grad_accum": 2})
    one_batch = make_recipe(name="one-batch", training={**training, "batch_size": 4, "grad_accum": 1})
    for recipe in (accumulated, one_batch):
        assert finetune(recipe).exit_code == 0
    a, b = (load_file(str(out_dir(r) / "adapter_model.safetensors")) for r in (accumulated, one_batch))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
