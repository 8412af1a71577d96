"""`lorachat merge ADAPTER --out DIR`: a merged model folder that plain transformers loads, equal to the adapter on
its base, written atomically, on the tiny model (the SmolLM2 figures are in test_merge_real.py)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from adapter_factory import copy_of, faq_moved, faq_moved_4bit
from lora_chat.cli import main

PROMPT = [{"role": "user", "content": "Question 3: how long does a building permit take?"},
          {"role": "assistant", "content": "Answer 3: the statutory processing time is ten weeks."}]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture
def base(tiny_base) -> Path:
    return tiny_base


@pytest.fixture
def adapter(tmp_path_factory, tiny_base) -> Path:
    return faq_moved(tmp_path_factory, tiny_base)


@pytest.fixture
def qlora_adapter(tmp_path_factory, tiny_base) -> Path:
    return faq_moved_4bit(tmp_path_factory, tiny_base)


def merge(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["merge", *map(str, args)])
    return result.exit_code, result.output


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(PROMPT, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits[0].float()


def adapter_on_base(base: Path, adapter: Path, **load) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_chat.models.bnb_cpu import keep_4bit_weights_unpacked

    model = AutoModelForCausalLM.from_pretrained(base, **load)
    # As trained: bitsandbytes' AVX512-BF16 repacking would compute in bf16, and cannot take the tiny model's layers.
    keep_4bit_weights_unpacked(model)
    model = PeftModel.from_pretrained(model, adapter).eval()
    return logits_of(model, AutoTokenizer.from_pretrained(adapter))


def merged_model(out: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return logits_of(AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out))


def card_meta(out: Path) -> dict:
    return yaml.safe_load((out / "README.md").read_text().split("---")[1])


def test_merged_folder_loads_with_plain_transformers_and_equals_the_adapter_on_its_base(root, base, adapter):
    out = root / "merged"
    code, output = merge(adapter, "--out", out, "--dtype", "float32")
    assert code == 0, output
    assert "max |logit diff|" in output
    # Checked here independently of lorachat's own check, on a conversation the test tokenizes itself.
    diff = (merged_model(out) - adapter_on_base(base, adapter)).abs().max().item()
    assert diff <= 1e-4
    assert (out / "model.safetensors").is_file() and not list(out.glob("adapter_*"))
    assert (out / "chat_template.jinja").read_text() == (adapter / "chat_template.jinja").read_text()
    meta = card_meta(out)
    assert meta["base_model"] == str(base) and meta["base_model_relation"] == "merge"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_bfloat16_merge_is_checked_with_a_bfloat16_tolerance(root, adapter):
    out = root / "merged-bf16"
    code, output = merge(adapter, "--out", out, "--dtype", "bfloat16")
    assert code == 0, output
    assert "(bfloat16)" in output and "tolerance 4" in output
    assert "| tolerance (bfloat16) |" in (out / "README.md").read_text()


def test_qlora_adapter_is_merged_into_the_dequantized_4bit_base_it_was_trained_on(root, base, qlora_adapter):
    """Merging into the original float weights would ignore what 4-bit rounding did to the base the adapter
    learned on; the merged model must compute what the adapter on its 4-bit base computes."""
    from transformers import BitsAndBytesConfig

    out = root / "merged-qlora"
    code, output = merge(qlora_adapter, "--out", out, "--dtype", "float32")
    assert code == 0, output
    on_4bit = adapter_on_base(base, qlora_adapter, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32), dtype=torch.float32)
    merged = merged_model(out)
    assert (merged - on_4bit).abs().max().item() <= 1e-4
    # ...while the adapter on the unquantized weights is visibly another model.
    assert (adapter_on_base(base, qlora_adapter) - on_4bit).abs().max().item() > 1e-2
    card = (out / "README.md").read_text()
    assert "trained on a 4bit (bitsandbytes) base" in card and "never into 4bit weights" in card


def test_existing_out_is_refused_without_overwrite_and_replaced_whole_with_it(root, adapter):
    out = root / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = merge(adapter, "--out", out)
    assert code == 2
    assert output.strip().splitlines() == [f"error: --out: {out} already exists; use --overwrite to replace it "
                                           f"(the old one stays until the new one is whole)"]
    assert (out / "keep.txt").read_text() == "mine"
    code, output = merge(adapter, "--out", out, "--overwrite")
    assert code == 0, output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".taken")]


def test_a_check_over_tolerance_fails_and_leaves_nothing(root, adapter):
    out = root / "strict"
    code, output = merge(adapter, "--out", out, "--dtype", "bfloat16", "--tolerance", "0")
    assert code == 1
    assert "the merged model differs from the adapter on its base: max |logit diff|" in output
    assert "nothing was written" in output
    assert not out.exists() and not [p for p in root.iterdir() if p.name.startswith(".strict")]


def test_full_disk_mid_write_is_one_line_and_leaves_nothing(root, adapter, monkeypatch):
    from lora_chat.merge import into_base

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(into_base, "write_text_atomic", full)  # the card, written after the weights
    out = root / "full"
    code, output = merge(adapter, "--out", out)
    assert code == 2
    assert output.strip().splitlines()[-1] == f"error: {out}: cannot write: disk full; nothing was written"
    assert not out.exists() and not [p for p in root.iterdir() if p.name.startswith(".full")]


def test_killed_merge_leaves_no_folder_that_looks_whole(root, adapter):
    out = root / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "lora_chat.cli", "merge", str(adapter), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900  # a loaded CI machine can take minutes just to import torch
    while proc.poll() is None and time.monotonic() < deadline:
        if list(root.glob(".killed.tmp-*")):  # writing has begun
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the merge finished before it could be killed"
    assert not out.exists()
    assert [p.name.startswith(".killed.tmp-") for p in root.iterdir() if "killed" in p.name] == [True]


def test_adapter_without_manifest_is_refused(root, adapter):
    broken = copy_of(adapter, root / "no-manifest")
    (broken / "manifest.json").unlink()
    code, output = merge(broken, "--out", root / "x")
    assert code == 2
    assert output.strip() == (f"error: {broken}: not a complete lorachat adapter: no manifest.json "
                              f"(an unfinished or foreign run?)")


def test_tampered_weights_are_refused_before_any_work(root, adapter):
    tampered = copy_of(adapter, root / "tampered")
    weights = tampered / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, output = merge(tampered, "--out", root / "y")
    assert code == 2
    assert output.strip() == (f"error: {tampered}: does not match its manifest: {weights}: sha256 differs from "
                              f"manifest.json; refusing to use a tampered or damaged adapter")
    assert not (root / "y").exists()


def test_combine_options_are_refused_with_one_adapter(root, adapter):
    code, output = merge(adapter, "--out", root / "z", "--weights", "1")
    assert code == 2
    assert output.strip() == ("error: --weights: --weights combines several adapters; with one ADAPTER, merge "
                              "puts it into its base")
