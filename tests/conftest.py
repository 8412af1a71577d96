"""Shared fixtures: a tiny random chat model built in-process, and recipes written into tmp dirs.

The tiny model is a 2-layer Llama with a byte-level BPE tokenizer trained here on a few hundred
sentences, with ChatML special tokens and template, so unit tests need no download and run in
seconds. Tests on the real bundled SmolLM2 are marked `real_model`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is a building permit? A building permit is a decision from the municipality.",
    "How long does it take? The statutory processing time is ten weeks.",
    "Hello! How can I help you today? Goodbye and thank you.",
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]{}-_/\\",
    "Vad är bygglov? Bygglov är ett beslut från kommunen. Hur lång tid tar det?",
]


def build_tiny_base(path: Path, *, chat_template: str = CHATML, hidden_size: int = 32) -> Path:
    """A tiny random Llama + BPE tokenizer with ChatML tokens, saved as a normal model folder.

    bitsandbytes' CPU 4-bit kernels need every in_features >= 64: pass hidden_size=64 for QLoRA."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = chat_template
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """Path to a tiny random chat model folder (shared by the session; treat it as read-only)."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_base) -> Path:
    """faq-en (construction, English), one step of `lorachat finetune` on tiny_base, trained once per session and
    shared by the adapter and share modules: read it, or change a private copy (`adapter`)."""
    from adapter_factory import trained_once  # not at the top: adapter_factory imports this module's helpers

    return trained_once(tmp_path_factory, "faq-en", tiny_base, data={"train": [{"path": "train.jsonl"}]},
                        output={"domain": "construction", "language": "en"})


@pytest.fixture
def adapter(trained, tmp_path) -> Path:
    """A private copy of `trained` under tmp_path/adapters/faq-en."""
    return Path(shutil.copytree(trained, tmp_path / "adapters" / "faq-en"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, reply: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def sample_rows(n: int = 24) -> list[dict]:
    return [chat(f"Question {i}: how long does a building permit take?",
                 f"Answer {i}: the statutory processing time is ten weeks.") for i in range(n)]


@pytest.fixture
def make_recipe(tmp_path, tiny_base):
    """Write a recipe (and its data) into tmp_path; keyword sections override the defaults."""

    def make(rows: list | None = None, name: str = "test-run", **sections) -> Path:
        data_file = write_jsonl(tmp_path / "train.jsonl", rows if rows is not None else sample_rows())
        recipe = {
            "name": name,
            "base": {"model": str(tiny_base), "dtype": "float32"},
            "data": {"train": [{"path": data_file.name}], "max_length": 128},
            "training": {"max_steps": 4, "batch_size": 2, "grad_accum": 1, "lr": 1e-3, "log_every": 1},
            "output": {"dir": str(tmp_path / "adapters" / name)},
        }
        for section, values in sections.items():
            if isinstance(values, dict) and isinstance(recipe.get(section), dict):
                recipe[section] = {**recipe[section], **values}
            else:
                recipe[section] = values
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return path

    return make
