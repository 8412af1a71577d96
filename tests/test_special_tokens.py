"""A base without a chat template: ChatML's markers become special tokens, and only their rows are trained.

The base is a tiny GPT-2 built here: its byte-level BPE tokenizer knows `<|endoftext|>` and nothing of
ChatML, and it has no chat template, like GPT-2 itself. Also here: the one-line refusals for a base without
template under `template.name: auto` and for an encoder-only base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import CORPUS, chat, write_jsonl
from lora_chat.cli import main

REPLY = "hello there!"
CHATML_MARKERS = ["<|im_start|>", "<|im_end|>"]


def build_tiny_gpt2(path: Path) -> Path:
    """A 2-layer GPT-2 (tied embeddings) and a BPE tokenizer without ChatML tokens or chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((CORPUS + [f"say hello {REPLY}"]) * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    torch.manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    GPT2LMHeadModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def write_recipe(folder: Path, base: Path, **template) -> Path:
    write_jsonl(folder / "hello.jsonl", [chat("say hello", REPLY)] * 16)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "gpt2-chatml", "base": {"model": str(base), "dtype": "float32"},
        "template": {"name": "chatml", **template},
        "data": {"train": [{"path": "hello.jsonl"}], "eval": {"split": 0.0}, "max_length": 128},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": 30, "batch_size": 4, "grad_accum": 1, "lr": 3e-2, "warmup_ratio": 0.0, "scheduler": "constant",
                     "log_every": 10},
        "output": {"dir": str(folder / "adapter")}}), "utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gpt2_base) -> Path:
    """The adapter of a short ChatML run on the tiny GPT-2 (trained once for this module)."""
    folder = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(main, ["finetune", str(write_recipe(folder, gpt2_base))])
    assert result.exit_code == 0, result.output
    return folder / "adapter"


def load_back(adapter: Path, base: Path):
    """The base with the adapter, loaded the way every lorachat runtime does (PEFT + apply_added_tokens)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_chat.templates.tokens import apply_added_tokens

    tokenizer = AutoTokenizer.from_pretrained(base)  # the base's own: the added tokens must be rebuilt
    model = AutoModelForCausalLM.from_pretrained(base)
    manifest = json.loads((adapter / "manifest.json").read_text())
    apply_added_tokens(model, tokenizer, manifest)
    return PeftModel.from_pretrained(model, adapter).eval(), tokenizer


def test_validate_names_the_added_markers_and_their_parameter_cost(tmp_path, gpt2_base):
    result = CliRunner().invoke(main, ["validate", str(write_recipe(tmp_path, gpt2_base))])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # Two rows of the 32-wide input embedding; GPT-2's output layer is tied to it, so no second copy.
    assert ("added special tokens <|im_start|>, <|im_end|> (ids 350, 351); stop token <|im_end|>; their rows of "
            "the input embedding (the output layer is tied to it) are trained: 64 parameters") in text
    assert "warning" not in text


def test_add_special_tokens_false_keeps_markers_as_text_pieces_and_warns(tmp_path, gpt2_base):
    result = CliRunner().invoke(main, ["validate", str(write_recipe(tmp_path, gpt2_base, add_special_tokens=False))])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "added special tokens" not in text
    assert ("template.add_special_tokens is false: <|im_start|>, <|im_end|> are trained as several text pieces "
            "each") in text


def test_the_adapter_records_the_added_tokens_and_saves_only_their_rows(trained, gpt2_base):
    from safetensors import safe_open

    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["tokens"]["added"] == CHATML_MARKERS and manifest["tokens"]["ids"] == [350, 351]
    assert manifest["tokens"]["vocab_size"] == 352 and manifest["tokens"]["end_of_turn"] == "<|im_end|>"
    config = json.loads((trained / "adapter_config.json").read_text())
    assert list(config["trainable_token_indices"].values()) == [[350, 351]]
    generation = json.loads((trained / "generation_config.json").read_text())
    assert 351 in generation["eos_token_id"]
    with safe_open(trained / "adapter_model.safetensors", "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    rows = [shape for key, shape in shapes.items() if "trainable_tokens" in key]
    assert rows == [(2, 32)], "the two new rows, once (tied)"
    assert not any(shape[0] >= 350 for shape in shapes.values()), "no whole embedding matrix in the adapter"


def test_after_training_the_model_ends_its_reply_with_the_new_end_of_turn_token(trained, gpt2_base):
    import torch

    model, tokenizer = load_back(trained, gpt2_base)
    prompt = "<|im_start|>user\nsay hello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids[0].tolist().count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2, "one token each again"
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert out[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.decode(out)
    assert tokenizer.decode(out, skip_special_tokens=True) == REPLY


def test_eval_loads_the_adapter_with_the_same_vocabulary(trained, tmp_path):
    data = write_jsonl(tmp_path / "held_out.jsonl", [chat("say hello", REPLY)])
    result = CliRunner().invoke(main, ["eval", str(trained), "--data", str(data), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    sample = report["samples"][0]
    assert "<|im_start|>user\nsay hello<|im_end|>" in sample["prompt"]
    assert sample["replies"][trained.name] == REPLY, "stops at <|im_end|>, which decodes to nothing"


def test_vllm_is_refused_for_an_adapter_that_trains_token_rows_and_merge_is_named(trained, tmp_path):
    from lora_chat.templates.tokens import vllm_refusal

    reason = vllm_refusal(trained)
    assert reason is not None and "vLLM does not load" in reason and f"lorachat merge {trained}" in reason


def test_merge_carries_the_added_tokens_into_a_model_that_stops_on_them(trained, tmp_path):
    """The way to serve such an adapter at scale: merged, the model has the new vocabulary and stop token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(trained), "--out", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(tokenizer) == 352 and model.get_input_embeddings().num_embeddings == 352
    assert end in ([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int)
                   else model.generation_config.eos_token_id)
    ids = tokenizer("<|im_start|>user\nsay hello<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt",
                    add_special_tokens=False).input_ids
    with torch.no_grad():
        reply = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert reply[-1].item() == end and tokenizer.decode(reply, skip_special_tokens=True) == REPLY


def test_export_and_combine_refuse_an_adapter_with_added_tokens_and_name_merge(trained, tmp_path):
    exported = CliRunner().invoke(main, ["export", str(trained), "--format", "gguf", "--out", str(tmp_path / "x.gguf")])
    assert exported.exit_code == 2 and "lorachat merge" in exported.output and not (tmp_path / "x.gguf").exists()
    combined = CliRunner().invoke(main, ["merge", str(trained), str(trained), "--method", "linear", "--weights",
                                         "0.5,0.5", "--out", str(tmp_path / "both")])
    assert combined.exit_code == 2 and "lorachat merge" in combined.output and not (tmp_path / "both").exists()


def test_a_base_without_chat_template_and_template_auto_lists_the_built_ins(tmp_path, gpt2_base):
    """Its one line names the base, the built-ins and both ways to choose (template.name, template.file)."""
    path = write_recipe(tmp_path, gpt2_base)
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "template.name=auto"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"the tokenizer of '{gpt2_base}' has no chat template" in line
    assert "set template.name to one of alpaca, chatml, gemma, llama3" in line and "or template.file" in line


def test_an_encoder_only_base_is_refused_before_any_weights_load(tmp_path):
    """A folder with BERT's config.json and no weights at all: the refusal comes from config.json alone."""
    bert = tmp_path / "bert-base-uncased"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert",
                                                  "hidden_size": 768, "vocab_size": 30522}))
    write_jsonl(tmp_path / "d.jsonl", [chat("hi", "hello")])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "bert", "base": {"model": str(bert)},
                                      "data": {"train": [{"path": "d.jsonl"}]}}))
    result = CliRunner().invoke(main, ["finetune", str(recipe)])
    assert result.exit_code == 2
    assert (f"base.model: {bert} is an encoder-only model (model_type bert (BertForMaskedLM)): it reads text but "
            f"cannot write replies") in result.output


@pytest.mark.parametrize("tied", [True, False])
def test_only_the_new_rows_are_trained_whether_the_output_layer_is_tied_or_not(gpt2_base, tied):
    """Tied (GPT-2, SmolLM2): the output layer follows the input rows. Untied (Llama-3-8B): its own rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_chat.templates.tokens import AddedTokens, prepare_model

    model = AutoModelForCausalLM.from_pretrained(gpt2_base, tie_word_embeddings=tied)
    added = AddedTokens(tuple(CHATML_MARKERS), (350, 351), "<|im_end|>", vocab_size=352, base_vocab_size=350,
                        hidden_size=32, tied=tied)
    rows = prepare_model(model, added)
    assert model.get_input_embeddings().num_embeddings == 352 and model.get_output_embeddings().out_features == 352
    assert 351 in model.generation_config.eos_token_id
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], trainable_token_indices=rows))
    token_params = {name: p.numel() for name, p in peft.named_parameters()
                    if p.requires_grad and "trainable_tokens" in name}
    assert sum(token_params.values()) == added.trainable_params == (64 if tied else 128)
    assert any("lm_head" in name for name in token_params) is not tied
